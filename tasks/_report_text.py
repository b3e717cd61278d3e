"""The auto-opt report as a terminal table and as Prefect artifacts (dashboard)."""

from __future__ import annotations

from typing import cast

__all__ = ["ROWS", "format_finetune_report", "format_report", "markdown_report", "table_rows"]

ROWS = {
    "size_mb": "size on disk (MB)",
    "perplexity": "perplexity",
    "prefill_ms": "prefill (ms)",
    "decode_tok_s": "decode (tokens/s)",
    "top1_agreement": "top-1 agreement vs reference",
    "min_cosine": "output cosine vs reference (min)",
}
_LABELS = {"pytorch_latency_ms_avg": "pytorch fp32 latency ms avg"}  # labelled, in the metrics' own order
# PyTorch's percentiles stay in grove_report.json: the table keeps its average, which latency_vs_pytorch divides by.
_SKIP = {"seconds", "ppl_tokens", "ppl_chunk", "prompt_tokens", "generated_tokens", "threads", "cpu_busy_elsewhere",
         "pytorch_cpu_busy_elsewhere", *(f"pytorch_latency_ms_p{q}" for q in (50, 90, 95, 99))}
# The row that times the baseline, not the model: output / reference is how the machine drifted between the two
# evaluations, not what the optimization did, so it gets no ratio.
_NO_RATIO = {"pytorch_latency_ms_avg"}


def table_rows(report: dict[str, object]) -> list[dict[str, object]]:
    metrics = report.get("metrics") or {}
    reference = report.get("reference") or {}
    assert isinstance(metrics, dict) and isinstance(reference, dict)
    keys = [k for k in ROWS if k in metrics] + [
        k for k, v in metrics.items()
        if k not in ROWS and k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows = []
    for key in keys:
        label = ROWS.get(key) or _LABELS.get(key) or key.replace("_", " ")
        out, ref = metrics.get(key), reference.get(key)
        ratio = (round(out / ref, 3) if isinstance(out, (int, float)) and isinstance(ref, (int, float)) and ref
                 and key not in _NO_RATIO else None)
        rows.append({"metric": label, "output": out, "reference": ref, "ratio": ratio})
    return rows


def format_report(report: dict[str, object], output_path: str) -> str:
    target = report.get("target") or {}
    assert isinstance(target, dict)
    metrics = report.get("metrics") or {}
    if isinstance(metrics, dict) and isinstance(components := metrics.get("components"), dict):
        return _format_components(report, target, components, output_path)
    head = (f"Optimized {report.get('model')} -> {output_path}\n"
            f"target: {target.get('device')}/{target.get('provider')} {target.get('precision')}"
            + (f" ({target.get('int4_algorithm')}, block {target.get('block_size')}"
               + (", 8-bit embedding" if target.get("embedding_int8") else "") + ")"
               if target.get("block_size") else "")
            + (f", {target['task']}" if target.get("task") else "")
            + (f", SparseGPT {target['sparsity']}" if target.get("sparsity") else ""))
    metrics, reference = report.get("metrics") or {}, report.get("reference") or {}
    assert isinstance(metrics, dict) and isinstance(reference, dict)
    if metrics.get("threads"):
        head += f"; timings with {metrics['threads']} threads"
    if isinstance(huge := metrics.get("huge_pages"), bool):  # glibc's tunable: grove/timing.py
        head += ", on transparent huge pages" if huge else ", without transparent huge pages"
    if isinstance(busy := metrics.get("cpu_busy_elsewhere"), (int, float)):
        ref_busy = reference.get("cpu_busy_elsewhere")
        head += (f" (other processes used {busy:.0%} of the CPUs meanwhile"
                 + (f", {ref_busy:.0%} during the reference's" if isinstance(ref_busy, (int, float)) else "") + ")")
    precision = reference.get("precision", "fp32")
    head += "; reference: the input graph" if precision == "input graph" else f"; reference: the {precision} model"
    rows = table_rows(report)
    cols = ["metric", "output", "reference", "ratio"]
    lines = _table(cols, [[_fmt(r[c]) for c in cols] for r in rows])
    sample = metrics.get("sample")
    tail = f"\nsample answer to the evaluation prompt:\n  {sample!s:.300}" if sample else ""
    files = ", ".join(str(f) for f in cast("list[object]", report.get("files") or []))
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nfiles: {files}{tail}"


def _format_components(report: dict[str, object], target: dict[str, object], components: dict[str, dict[str, object]],
                       output_path: str) -> str:
    """auto-opt --components: each exported component's size, and whether and how fast it runs."""
    head = (f"Exported {report.get('model')} -> {output_path}\n"
            f"target: {target.get('device')}/{target.get('provider')} {target.get('precision')}; each component "
            "measured alone, on synthetic inputs where they fit it")
    cells = [[name, _fmt(c.get("size_mb")), "yes" if c.get("loads") else "no",
              _fmt(c.get("latency_ms_avg")) if c.get("runs") else f"not run: {c.get('reason')!s:.70}"]
             for name, c in components.items()]
    lines = _table(["component", "size (MB)", "loads", "run (ms)"], cells)
    files = ", ".join(str(f) for f in cast("list[object]", report.get("files") or []))
    return f"{head}\n\n" + "\n".join(lines) + f"\n\nfiles: {files}\nnext: grove auto-opt -m {output_path}/<component>" \
        "/model.onnx -o <folder> --precision int8 (or int4): its weights quantized and measured against it"


def markdown_report(report: dict[str, object], output_path: str) -> str:
    return "```\n" + format_report(report, output_path) + "\n```"


def _table(cols: list[str], cells: list[list[str]]) -> list[str]:
    """A header and rows, each column as wide as its widest cell."""
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in [cols, *cells]]


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_finetune_report(report: dict[str, object], output_path: str) -> str:
    """What ``grove finetune`` prints: where the adapter is, and what the training changed."""
    metrics = report.get("metrics") or {}
    adapter = report.get("adapter") or {}
    assert isinstance(metrics, dict) and isinstance(adapter, dict)

    def num(key: str, digits: int = 4) -> str:
        value = metrics.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    resumed = f" (resumed from step {metrics['resumed_from_step']})" if metrics.get("resumed_from_step") else ""
    lines = [f"Fine-tuned {report.get('model')} -> {output_path}/adapter",
             f"adapter: {adapter.get('method')} r={adapter.get('r')} alpha={adapter.get('alpha')} on "
             f"{', '.join(map(str, adapter.get('target_modules') or []))}",
             f"steps: {metrics.get('steps')}{resumed}; train loss {num('first_loss')} -> {num('train_loss')}; "
             f"{num('tokens_per_s', 1)} tokens/s",
             f"eval loss {num('eval_loss_before')} -> {num('eval_loss_after')} (perplexity "
             f"{num('perplexity_before', 2)} -> {num('perplexity_after', 2)}) on {metrics.get('eval_on')}",
             f"next: grove auto-opt -m {output_path} -o <folder> (the int4 base with this adapter switchable "
             "beside it), or add --merge_adapter (one model with the adapter merged in)"]
    return "\n".join(lines)
