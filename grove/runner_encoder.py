"""Running the encoder flow: the embedded (or configured) Prefect API, the store's
result-storage block, then the flow, exactly as :mod:`grove.runner` runs the decoder flow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grove.request_encoder import EncoderOptRequest

if TYPE_CHECKING:
    from prefect.states import State

__all__ = ["run_encoder", "run_encoder_state"]


def run_encoder(request: EncoderOptRequest) -> dict[str, object]:
    """Run ``auto-opt-encoder``; returns the report written to the output path."""
    report: dict[str, object] = run_encoder_state(request).result()
    return report


def run_encoder_state(request: EncoderOptRequest) -> State:
    """Like run_encoder, but returns the flow run's final state (tests read its task runs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.runner import result_storage
    from grove.server import ensure_api

    # Prefect reads its settings at import, which may have happened before the API was known.
    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        from flows.optimize_encoder import optimize_encoder
        from grove.node import RESULT_SERIALIZER

        flow = optimize_encoder.with_options(result_storage=result_storage(request.store),  # type: ignore[arg-type]
                                             result_serializer=RESULT_SERIALIZER, persist_result=True)
        return flow(request, return_state=True)
