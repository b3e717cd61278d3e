"""Node ``train-adapter``: LoRA (peft) trained with transformers' Trainer on prepared token blocks;
writes ``adapter/`` (a peft folder) and ``train_log.json`` (the loss at every logged step).

Olive's LoRA pass is the reference for what defines the result: r 64, alpha 16, dropout 0.05, peft's
per-architecture target modules, AdamW at 2e-4 on a constant schedule after 3% warm-up. What decides
speed is chosen per device: on a CPU, activation checkpointing is off (it recomputes the forward pass:
half the speed, for memory a 135M-1B model does not need) and the weights stay fp32 under bf16 autocast
where the CPU has bf16 instructions (avx512_bf16 / AMX); on CUDA, Olive's bf16 weights and checkpointing.

Checkpoints go to the store every ``checkpoint_steps`` (tasks/_checkpoints.py, without pickles): a
training killed mid-way and run again resumes from its last checkpoint, and the log says from which
step. QLoRA (a 4-bit base through bitsandbytes) needs CUDA; the node asks for the gpu pool.
"""

from __future__ import annotations

import difflib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, Device, StepConfig
from grove.errors import InvalidRequest, MissingExtra
from grove.node import RECIPE_CACHE, node_logger, node_scratch, report_progress, run_node
from grove.tasks._checkpoints import StoreCheckpoints
from grove.tasks.architectures import torch_spec
from grove.tasks.prepare_data import load_blocks

__all__ = ["OLIVE_TRAINING_DEFAULTS", "TrainConfig", "cpu_has_bf16", "linear_names", "peft_config", "resolve_targets",
           "skeleton", "train_adapter"]

# Olive's HFTrainingArguments defaults (olive/passes/pytorch/lora.py), where they differ from transformers'.
# Olive's warmup_ratio 0.03: transformers 5 reads a warmup_steps below 1 as that ratio (warmup_ratio is gone).
OLIVE_TRAINING_DEFAULTS: dict[str, Any] = {"learning_rate": 2e-4, "lr_scheduler_type": "constant",
                                           "warmup_steps": 0.03}
# TrainingArguments that say how a run reports or stores itself, not what it learns: not in the recipe.
RUN_ONLY_ARGS = frozenset({"logging_steps", "logging_strategy", "logging_first_step", "save_steps", "save_strategy",
                           "save_total_limit", "report_to", "disable_tqdm", "run_name", "logging_dir",
                           "dataloader_num_workers", "dataloader_pin_memory"})
ADAPTER_DIR = "adapter"
TRAIN_LOG = "train_log.json"


class TrainConfig(StepConfig):
    NODE = "train-adapter"
    VERSION = 1
    # Trains anywhere, much faster on a GPU: dispatched to a gpu pool while one has a live worker.
    PREFERS: ClassVar[Device | None] = "gpu"
    method: Literal["lora", "qlora", "dora", "loha", "lokr"] = Field("lora", description="the adapter: lora, qlora "
                                                                    "(lora on a 4-bit base), dora, loha or lokr")
    lora_r: int = Field(64, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="module names to adapt; None: peft's per-architecture "
                                             "default (q_proj, v_proj for llama and qwen2)")
    torch_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the base weights' dtype "
                                                                    "while training")
    bf16_autocast: bool = Field(False, description="compute in bf16 under autocast (fp32 weights)")
    gradient_checkpointing: bool = False
    training_args: dict[str, Any] = Field(default_factory=dict, description="transformers TrainingArguments given "
                                          "on the command line (Olive's defaults fill the rest)")
    checkpoint_steps: int = Field(50, ge=1, description="a checkpoint to the store this often (not in the recipe)")
    log_steps: int = Field(5, ge=1, description="the loss to the log this often (not in the recipe)")

    @property
    def device(self) -> Device | None:
        return self.placement or ("gpu" if self.method == "qlora" else None)

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        for field in ("checkpoint_steps", "log_steps"):
            del recipe[field]
        recipe["training_args"] = {k: v for k, v in self.training_args.items() if k not in RUN_ONLY_ARGS}
        return recipe


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): then bf16 autocast trains faster
    (42 vs 32 tokens/s for SmolLM2-shaped r=16 here, FINETUNE-NOTES.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@task(name="train-adapter", cache_policy=RECIPE_CACHE)
def train_adapter(model: Artifact, data: Artifact, config: TrainConfig) -> Artifact:
    """HF model folder + token blocks -> LoRA adapter."""
    return run_node(config, [model, data], model.store, _train)


def linear_names(model: Any) -> list[str]:
    """The distinct names of the model's Linear layers (what LoRA can adapt), e.g. q_proj, down_proj."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def resolve_targets(model: Any, targets: list[str] | None) -> list[str] | str:
    """``targets`` checked against the model's Linear layers (an unknown one is an error listing them),
    or peft's default for the architecture."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    linears = linear_names(model)
    if targets is None:
        default = DEFAULTS.get(model.config.model_type)
        if default is None:
            raise InvalidRequest(f"peft has no default LoRA targets for {model.config.model_type}; pass "
                                 f"--target_modules, from this model's Linear layers: {', '.join(linears)}")
        return sorted(default)
    if targets == ["all-linear"]:
        return "all-linear"
    if unknown := [t for t in targets if t not in linears]:
        close = difflib.get_close_matches(unknown[0], linears, n=1)
        raise InvalidRequest(f"--target_modules {unknown[0]}: this model has no Linear layer of that name"
                             f"{f' (did you mean {close[0]}?)' if close else ''}; its Linear layers: "
                             f"{', '.join(linears)} (or all-linear)")
    return targets


def skeleton(source: Any) -> Any | None:
    """The source's model with no weights (on torch's meta device: no memory, a fraction of a second), to
    check LoRA targets against before any work; None where its config is not at hand (an s3:// folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.kind == "local":
        config = AutoConfig.from_pretrained(source.location)
    elif source.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source.location, revision=source.revision, allow_patterns=["config.json"])
        config = AutoConfig.from_pretrained(folder)
    elif source.kind == "gguf":
        path = Path(source.location)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        return None
    torch_spec(config.model_type, "fine-tuning")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _train(inputs: list[Path], config: TrainConfig, out: Path) -> dict[str, object]:
    import torch
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator, set_seed

    model_dir, data_dir = inputs
    log = node_logger()
    cuda = torch.cuda.is_available()
    set_seed(int(config.training_args.get("seed", 42)))  # LoRA's A starts random: the same seed, the same adapter
    model = _load_base(model_dir, config, cuda)
    targets = resolve_targets(model, config.target_modules)
    model = get_peft_model(model, peft_config(config, targets))
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointing a frozen base needs its inputs to carry gradients
    train = load_blocks(data_dir, "train")
    data_facts = json.loads((data_dir / "data.json").read_text())
    tokens_per_block = data_facts["train_tokens"] / max(1, data_facts["train_blocks"])
    store, scratch = node_scratch()
    checkpoints = StoreCheckpoints(store, f"{scratch}/checkpoints")
    with tempfile.TemporaryDirectory(prefix="grove-train-") as tmp:
        args = TrainingArguments(**_arguments(config, Path(tmp) / "run", cuda))
        progress = _Progress(args, tokens_per_block, log)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                          callbacks=[progress, _ToStore(checkpoints)])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; _Progress logs them
        resume = Path(tmp) / "resume"
        step = checkpoints.latest(resume)
        if step is not None:
            log.info("resuming from step %d (its checkpoint in the store)", step)
        result = trainer.train(resume_from_checkpoint=str(resume) if step is not None else None)
        model.save_pretrained(str(out / ADAPTER_DIR))
        history = [{k: v for k, v in entry.items() if isinstance(v, (int, float))}
                   for entry in trainer.state.log_history]
    losses = [e for e in history if "loss" in e]
    (out / TRAIN_LOG).write_text(json.dumps(losses, indent=1))
    trained = progress.steps_here * args.per_device_train_batch_size * args.gradient_accumulation_steps
    metrics = {"steps": int(result.global_step), "resumed_from_step": step, "train_loss": _last(losses, "loss"),
               "first_loss": losses[0]["loss"] if losses else None, "target_modules": list(targets)
               if isinstance(targets, list) else [targets], "trainable_params": _trainable(model),
               "tokens_per_s": round(trained * tokens_per_block / progress.seconds, 1) if progress.seconds else None,
               "device": "cuda" if cuda else "cpu", "bf16_autocast": config.bf16_autocast}
    log.info("trained %d steps: loss %s -> %s", metrics["steps"], metrics["first_loss"], metrics["train_loss"])
    return metrics


def peft_config(config: TrainConfig, targets: list[str] | str) -> Any:
    """peft's config for the method: LoRA (and QLoRA, LoRA on a 4-bit base), DoRA (LoRA whose update is
    split into a magnitude and a direction, peft's use_dora), LoHa (a Hadamard product of two low-rank
    pairs) or LoKr (a Kronecker product). The rank and alpha mean what Olive's passes of those names
    give peft; LoRA's dropout applies to LoRA and DoRA (LoHa and LoKr keep peft's rank and module
    dropout, 0, as Olive's passes do)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if config.method in ("loha", "lokr"):
        cls = LoHaConfig if config.method == "loha" else LoKrConfig
        return cls(r=config.lora_r, alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft takes a float
                   target_modules=targets, task_type="CAUSAL_LM")
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft takes a float
                      lora_dropout=config.lora_dropout, use_dora=config.method == "dora",
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


def _load_base(model_dir: Path, config: TrainConfig, cuda: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_spec(model_dir, "fine-tuning")
    dtype = getattr(torch, config.torch_dtype)
    if config.method != "qlora":
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if not cuda:
        raise InvalidRequest("--method qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU and "
                             "this machine has none; use --method lora, or run on a machine (or a deployed gpu "
                             "pool) with a GPU")
    try:
        import bitsandbytes  # noqa: F401
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise MissingExtra("bitsandbytes", "pip install bitsandbytes on the GPU machine (QLoRA's 4-bit base)") from exc
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, quantization_config=quant,
                                                 device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)


def _arguments(config: TrainConfig, output_dir: Path, cuda: bool) -> dict[str, Any]:
    args: dict[str, Any] = {**OLIVE_TRAINING_DEFAULTS, "per_device_train_batch_size": 1,
                            **config.training_args}
    args.update(output_dir=str(output_dir), save_strategy="steps", save_steps=config.checkpoint_steps,
                save_total_limit=1, logging_steps=config.log_steps, report_to="none", disable_tqdm=True,
                use_cpu=not cuda)
    args["activation_checkpointing"] = config.gradient_checkpointing  # transformers 5's name for it
    if config.bf16_autocast:
        args["bf16"] = True
    if config.method == "qlora":
        args.setdefault("optim", "paged_adamw_32bit")  # Olive's QLoRA optimizer
    return args


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _last(entries: list[dict[str, Any]], key: str) -> float | None:
    return float(entries[-1][key]) if entries else None


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class _Progress(_callback_base()):  # type: ignore[misc]
    """Step, loss and tokens/s to the log and the run's progress bar at each logging step."""

    def __init__(self, args: Any, tokens_per_block: float, log: Any) -> None:
        self.tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * tokens_per_block
        self.log = log
        self.steps_here = 0
        self.seconds = 0.0
        self._mark: tuple[float, int] | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._mark is None:
            self._mark = (time.perf_counter(), state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        start, first = self._mark or (time.perf_counter(), state.global_step)
        self.seconds = time.perf_counter() - start
        self.steps_here = state.global_step - first

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        speed = self.steps_here * self.tokens_per_step / self.seconds if self.seconds else 0.0
        note = f"step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4f}, {speed:.0f} tokens/s"
        self.log.info("%s", note)
        report_progress(state.global_step / max(1, state.max_steps), note)


class _ToStore(_callback_base()):  # type: ignore[misc]
    """Each checkpoint the Trainer writes, kept in the store (the Trainer's own folder is temporary)."""

    def __init__(self, checkpoints: StoreCheckpoints) -> None:
        self.checkpoints = checkpoints

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.checkpoints.save(folder, state.global_step)
