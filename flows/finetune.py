"""``finetune``: LoRA fine-tuning of one base model on one dataset. Reads like the DAG: wiring only."""

from __future__ import annotations

from prefect import flow

from grove.flows.request_finetune import FinetuneRequest
from grove.tasks.download_model import DownloadConfig, download_model, resolve_source
from grove.tasks.evaluate_adapter import AdapterEvalConfig, evaluate_adapter
from grove.tasks.package_finetune import FinetunePackageConfig, export_finetune, package_finetune
from grove.tasks.prepare_data import fingerprint_data, prepare_data
from grove.tasks.publish_report import publish_finetune_report
from grove.tasks.train_adapter import train_adapter

__all__ = ["finetune"]


@flow(name="finetune", log_prints=False)
def finetune(request: FinetuneRequest) -> dict[str, object]:
    """Base model -> token blocks -> LoRA adapter -> eval loss before / after -> packaged adapter -> output path."""
    source = resolve_source(request.model_name_or_path, request.revision)
    train_files, eval_files = request.files("train"), request.files("eval")
    data_sha256 = fingerprint_data(train_files + eval_files)
    base = download_model(source, DownloadConfig(trust_remote_code=request.trust_remote_code), request.store)
    data = prepare_data(base, request.prepare(train_files, eval_files, data_sha256))
    train = request.train()
    adapter = train_adapter(base, data, train)
    evaluation = evaluate_adapter(base, data, adapter, AdapterEvalConfig())
    package = package_finetune(adapter, evaluation, data, FinetunePackageConfig(
        model=request.model_name_or_path, base_digest=source.digest,
        adapter={"method": train.method, "r": train.lora_r, "alpha": train.lora_alpha}))
    report = export_finetune(package, request.output_path)
    publish_finetune_report(report, request.output_path)
    return report
