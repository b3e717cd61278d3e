"""``grove``: Olive's command line, run as a cached Prefect DAG.

Errors the user can fix print one line (``grove: error: ...``) and exit 2; nothing is left at
the output path.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from grove import __version__
from grove.errors import GroveError

if TYPE_CHECKING:
    from grove.flows.flags import Flag
    from grove.flows.olive_config import Translation

__all__ = ["entry", "main", "wind_down"]

_LOG_LEVELS = {0: "DEBUG", 1: "INFO", 2: "WARNING", 3: "ERROR", 4: "CRITICAL"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        expanded = _expand_run(argv)
        if isinstance(expanded, int):
            return expanded
        *before, argv = expanded
        for step in before:  # a fine-tuning config: grove finetune first
            if code := main(step):
                return code
    if argv[:1] == ["finetune"]:  # every flag it does not know is one of transformers' TrainingArguments
        args, unknown = parser.parse_known_args(argv)
        try:
            args.training_args = _training_flags(unknown)
        except GroveError as exc:
            return _fail(str(exc))
    else:
        args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except GroveError as exc:  # any command's (e.g. the local server that cannot start): the message, no traceback
        return _fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit status for SIGINT, no traceback
        print("grove: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: ``main`` (``auto-opt`` in a fork of the warm runner, see grove/shell/warm.py),
    then exit without the interpreter's teardown. Once the report is printed and the exit handlers
    have run (Prefect's flush logs and events to the API), nothing is left to do, yet unloading
    torch, onnxruntime and Prefect took ~1.8 s after a cold auto-opt here (0.5 s after a cached one)."""
    argv = sys.argv[1:]
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv):  # an Olive config: the auto-opt it amounts to
        expanded = _expand_run(argv)
        if isinstance(expanded, int):
            wind_down()
            os._exit(expanded)
        *before, argv = expanded
        for step in before:  # a fine-tuning config: grove finetune first, in this process
            if failed := main(step):
                wind_down()
                os._exit(failed)
    if argv[:1] == ["auto-opt"] and not {"-h", "--help"} & set(argv):
        from grove.shell import warm

        code = warm.run(argv) if warm.enabled() else None
        if code is not None:
            os._exit(code)
    code = main(argv)
    wind_down()
    os._exit(code)


def wind_down() -> None:
    """What a normal exit runs before unloading modules: exit handlers (Prefect's log and event
    flushes), logging shutdown, stream flushes."""
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter's exit runs, without its teardown
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grove", description="Hardware-aware model optimization on Prefect.")
    parser.add_argument("--version", action="version", version=f"grove {__version__}")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("auto-opt", help="optimize one model for one target (Olive's auto-opt)")
    from grove.flows.flags import auto_opt_flags

    _add_flags(p, auto_opt_flags())
    p.add_argument("--log_level", type=int, choices=range(5), default=1,
                   help="0 debug (also the libraries' own warnings, which Grove otherwise keeps out of the log), "
                   "1 info (each node, as it runs), 2 warning, 3 error, 4 critical (default: 1)")
    p.set_defaults(run=_auto_opt)

    r = sub.add_parser("run", help="run an Olive workflow config (olive run --config) as the auto-opt it amounts to",
                       description="Reads an Olive workflow config (JSON or YAML): its input model, target system "
                       "and passes become 'grove auto-opt' flags, printed before the run; what Grove does "
                       "differently is printed as notes, and what it cannot honour is an error naming the key.")
    r.add_argument("--config", "--run-config", dest="config", required=True, help="Olive workflow config file")
    r.add_argument("-m", "--model_name_or_path", help="the model, instead of the config's input_model")
    r.add_argument("-t", "--task", help="the task, instead of the config's")
    r.add_argument("--trust_remote_code", action="store_true", default=None, help="as for auto-opt")
    r.add_argument("-o", "--output_path", help="the output folder, instead of the config's output_dir")
    r.add_argument("--log_level", type=int, choices=range(5), help="as for auto-opt (default: the config's "
                   "log_severity_level, else 1)")
    r.add_argument("--store", help="artifact store, as for auto-opt (the config's cache_dir is not it)")
    r.add_argument("--dry-run", action="store_true", help="print the auto-opt command the config amounts to, "
                   "run nothing")

    _finetune_parser(sub)
    _benchmark_parser(sub)
    from grove.shell.adapter_commands import add_parsers

    add_parsers(sub)

    s = sub.add_parser("server", help="the local Prefect server and warm runner that grove starts on demand")
    s.add_argument("action", choices=["status", "start", "stop"])
    s.set_defaults(run=_server)

    st = sub.add_parser("stack", help="the scaled-out stack as local processes: Prefect server, S3, workers")
    st.add_argument("action", choices=["up", "down", "status"])
    st.add_argument("--postgres", help="Postgres URL for the Prefect server (default: SQLite)")
    st.add_argument("--no-workers", action="store_true", help="start no workers")
    st.set_defaults(run=_stack)

    so = sub.add_parser("store", help="what the artifact store holds (usage), and removing old artifacts (prune)",
                        description="Pruning never breaks a later run: a run that needs a pruned artifact "
                        "rebuilds it. The fleet registry (models/ in the store) is pruned only by --keep-versions.")
    so.add_argument("action", choices=["usage", "prune"])
    so.add_argument("--store", help="artifact store (default $GROVE_STORE or ~/.cache/grove/store)")
    so.add_argument("--older-than", type=float, metavar="DAYS",
                    help="prune: the artifacts built more than DAYS days ago (required; 0: all), and, "
                    "without --node, this machine's cached copies unused for as long")
    so.add_argument("--node", nargs="+", metavar="NODE", help="prune: only these nodes' artifacts, e.g. "
                    "download-model capture-onnx (the full-precision copies, the largest)")
    so.add_argument("--keep-versions", type=int, metavar="N", help="prune: in the fleet registry, keep the N "
                    "newest versions of each model x target (and the one latest.json points at), remove the rest")
    so.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")
    so.set_defaults(run=_store)

    f = sub.add_parser("fleet", help="refresh a fleet of models x targets from a manifest (YAML)")
    f.add_argument("action", choices=["refresh"])
    f.add_argument("manifest", help="fleet manifest YAML (example: deployments/fleet.example.yaml)")
    f.add_argument("--log_level", type=int, choices=range(5), default=1, help="as for auto-opt: 0 debug, 1 info "
                   "(each entry's steps), 2 warning (the summary only), 3 error, 4 critical")
    f.set_defaults(run=_fleet)

    d = sub.add_parser("deploy", help="apply pools, the store's result block and the deployments to "
                       "the Prefect server at PREFECT_API_URL (idempotent)")
    d.add_argument("--store", help="shared store, e.g. s3://bucket/prefix (default $GROVE_STORE)")
    d.add_argument("--fleet-manifest", help="fleet manifest YAML to refresh on a schedule (default nightly, 02:00 UTC)")
    d.add_argument("--cron", help="when the fleet refresh runs, as a cron expression (default '0 2 * * *')")
    d.add_argument("--timezone", help="time zone of --cron, IANA name (default UTC)")
    d.set_defaults(run=_deploy)
    return parser


class _RunFormatter(logging.Formatter):
    """``12:00:01 capture-onnx-3f2 | captured llama at fp32 for cpu``: each line says which node
    (Prefect task run) or run it comes from; Prefect's run loggers put those names on the record."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        who = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{self.formatTime(record, self.datefmt)} {f'{who} | ' if who else ''}{level}{record.getMessage()}"


def _not_event_transport(record: logging.LogRecord) -> bool:
    """Prefect's event client logs five DEBUG lines for each event it sends (over a hundred in a one-minute
    run, most of --log_level 0's output, which 176 olive-recipes files ask for): its transport, not the run.
    A filter on Grove's handler, since Prefect's logging setup resets its loggers' levels."""
    return record.levelno >= logging.INFO or not record.name.startswith("prefect.events.clients")


def _configure_logging(log_level: int) -> None:
    """Prefect's run loggers and Grove's at ``log_level`` (0-4), one compact line each (_RunFormatter)."""
    os.environ["PREFECT_LOGGING_LEVEL"] = _LOG_LEVELS[log_level]
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(_RunFormatter())
    handler.addFilter(_not_event_transport)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("grove").setLevel(_LOG_LEVELS[log_level])
    if "prefect.context" in sys.modules:  # imported before these settings (the warm runner): re-read them
        import prefect.context
        import prefect.logging.configuration

        prefect.context.refresh_global_settings_context()
        prefect.logging.configuration.setup_logging(incremental=False)


def _auto_opt(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    from pydantic import ValidationError

    from grove.errors import one_line
    from grove.flows.request_encoder import EncoderOptRequest

    fields = {k: v for k, v in vars(args).items() if k not in ("run", "log_level") and v is not None}
    try:
        from grove.flows.launch import request_from_flags
        from grove.shell.local_run import preflight, run_auto_opt

        request, source = request_from_flags(fields)
        if isinstance(request, EncoderOptRequest):
            if fields.get("use_ort_genai"):
                print("grove: --use_ort_genai applies to decoder LLMs; this encoder is written for onnxruntime "
                      "(model.onnx with its tokenizer files), which onnxruntime-genai does not load", file=sys.stderr)
            if "task" not in fields and request.task != "feature-extraction":
                print(f"grove: --task {request.task}: the head of {', '.join(source.architectures)}; "
                      "pass --task to choose another", file=sys.stderr)
        preflight(request, source)
        report = run_auto_opt(request)
    except ValidationError as exc:
        problems = one_line(exc, lambda loc: f"--{loc[0]}: " if loc else "")  # fields are named as the flags
        return _fail(f"invalid request: {problems}")
    except KeyboardInterrupt:
        print(f"grove: interrupted; {args.output_path} was left as it was (an output is written whole, after "
              "every step), and the steps that had finished stay in the store: the same command resumes "
              "after them", file=sys.stderr)
        return 130
    from grove.tasks._report_text import format_report

    print(format_report(report, args.output_path))
    return 0


def _expand_run(argv: list[str]) -> list[list[str]] | int:
    """``grove run --config F ...`` as the commands it amounts to, in order (the auto-opt argv, after
    grove finetune's for a config with a fine-tuning pass; the notes and the commands printed to
    stderr), or an exit code: 0 after --dry-run, 2 for a config Grove cannot honour."""
    from grove.flows.olive_config import load, translate

    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in ("model_name_or_path", "task", "trust_remote_code",
                                                               "output_path", "log_level", "store") and v is not None}
    try:
        stem = os.path.splitext(os.path.basename(args.config))[0]  # noqa: PTH119, PTH122 - pathlib not imported here
        translation = translate(load(args.config), overrides, default_output=f"{stem}-output")
    except GroveError as exc:
        return _fail(f"{args.config}: {exc}")
    if problem := _request_problem(translation):
        return _fail(f"{args.config}: {problem}")
    if int(cast(Any, translation.flags.get("log_level", 1))) <= 1 or args.dry_run:  # info: what the config amounts to
        for note in translation.notes:
            print(f"grove run: {note}", file=sys.stderr)
        print(f"grove run: {args.config} is: {translation.command()}", file=sys.stderr)
    if args.dry_run:
        print(translation.command())
        return 0
    level = ["--log_level", str(translation.flags.get("log_level", 1))]
    benchmark = [["benchmark", *translation.benchmark_argv(), *level]] if translation.benchmark_argv() else []
    if translation.benchmark is not None and not translation.benchmark_after:
        return benchmark
    finetune = [["finetune", *translation.finetune_argv(), *level]] if translation.finetune is not None else []
    return [*finetune, ["auto-opt", *translation.argv()], *benchmark]


def _request_problem(translation: Translation) -> str | None:
    """What auto-opt would refuse in the flags a config amounts to, found before any work (a dry run
    included). The model is not fetched, so whether a decoder or an encoder serves it is not known yet:
    the config is refused when neither request takes its flags, with the decoder's reason when a flag
    only decoders take is set, else the encoder's (an ONNXModel input: the graph path's)."""
    from pydantic import ValidationError

    from grove.errors import one_line
    from grove.flows.request import AutoOptRequest
    from grove.flows.request_encoder import DECODER_ONLY, EncoderOptRequest
    from grove.flows.request_graph import GraphOptRequest

    if translation.finetune is not None or (translation.benchmark is not None and not translation.benchmark_after):
        return None  # auto-opt's -m is the fine-tuning output, or there is no auto-opt
    parsed = vars(_parser().parse_args(["auto-opt", *translation.argv()]))
    fields = {k: v for k, v in parsed.items() if k not in ("run", "log_level") and v is not None}
    makers: list[Callable[[], object]] = [lambda: GraphOptRequest.from_flags(fields)] if translation.graph else [
        lambda: AutoOptRequest(**fields), lambda: EncoderOptRequest.from_flags(fields)]
    reasons = []
    for make in makers:
        try:
            make()
            return None
        except ValidationError as exc:
            reasons.append(one_line(exc, lambda loc: f"--{loc[0]}: " if loc else ""))
        except GroveError as exc:
            reasons.append(str(exc))
    decoder = translation.graph or fields.get("precision") == "int4" or any(k in fields for k in DECODER_ONLY)
    return f"the auto-opt it amounts to is refused: {reasons[0] if decoder else reasons[1]}"


def _server(args: argparse.Namespace) -> int:
    from grove.shell import server

    if args.action == "stop":
        from grove.shell import warm

        print("stopped" if server.stop_server() else "no grove server is running")
        if runners := warm.stop_all():
            print(f"stopped {runners} warm runner(s)")
    elif args.action == "start":
        from grove.shell import warm

        # First: ensure_api sets PREFECT_API_URL here, and the runner is keyed by the environment
        # the next auto-opt will have.
        warm.ensure()  # so that the next auto-opt forks it rather than importing
        server.ensure_api()
        print(f"Prefect UI: {(server.server_status() or {}).get('ui_url')}")
    else:
        state = server.server_status()
        print(f"running: UI {state['ui_url']}, API {state['api_url']}" if state else "not running")
    return 0


def _stack(args: argparse.Namespace) -> int:
    import json

    from grove.shell import stack

    if args.action == "up":
        state = stack.stack_up(args.postgres, workers=not args.no_workers)
        print(json.dumps(state, indent=2))
        env = cast("dict[str, str]", state["env"])
        print("\n# use it from a shell:\n" + "\n".join(f"export {k}={v}" for k, v in env.items()))
    elif args.action == "down":
        print("stopped" if stack.stack_down() else "no stack is running")
    else:
        status = stack.stack_status()
        print(json.dumps(status, indent=2) if status else "not running")
    return 0


def _store(args: argparse.Namespace) -> int:
    from pathlib import Path

    from grove.lease import remove_stale, scan_leases
    from grove.shell import housekeeping
    from grove.store import ArtifactStore

    if args.action == "usage" and (args.older_than is not None or args.node or args.dry_run
                                   or args.keep_versions is not None):
        return _fail("--older-than, --node, --keep-versions and --dry-run apply to 'grove store prune'")
    if args.action == "prune" and args.older_than is None and args.keep_versions is None:
        return _fail("grove store prune needs --older-than DAYS (the artifacts built longer ago are removed; 0: "
                     "all of them) and/or --keep-versions N (the fleet registry's older versions); add --dry-run "
                     "to see what that would be")
    if args.older_than is not None and not args.older_than >= 0:
        return _fail(f"--older-than {args.older_than:g}: pass a number of days, 0 or more")
    if args.node and args.older_than is None:
        return _fail("--node narrows --older-than: pass --older-than DAYS too")
    if args.keep_versions is not None and args.keep_versions < 1:
        return _fail(f"--keep-versions {args.keep_versions}: keep at least 1 (the version latest.json points at)")
    store = ArtifactStore(args.store)
    if store.is_local and not Path(store.root).is_dir():
        return _fail(f"artifact store {store.root} does not exist; check --store or GROVE_STORE")
    if not store.is_local:
        store.check_reachable()  # fails in seconds, where a listing would wait out the S3 client's retries
    if args.action == "usage":
        print(housekeeping.format_usage(store, housekeeping.scan(store), housekeeping.scan_registry(store)))
        print(housekeeping.format_leases(scan_leases(store)))
        print(housekeeping.format_caches(housekeeping.scan_caches()))
        return 0
    if args.older_than is not None:
        artifacts = housekeeping.scan(store)
        removed = housekeeping.prune(store, args.older_than * 86400, args.node, args.dry_run, artifacts)
        print(housekeeping.format_prune(removed, args.older_than, args.dry_run, args.node,
                                        {a.node for a in artifacts}))
        if not args.node:  # this machine's copies: re-fetched when needed
            copies = housekeeping.prune_caches(args.older_than * 86400, args.dry_run)
            print(housekeeping.format_cache_prune(copies, args.older_than, args.dry_run))
        if stale := remove_stale(store, scan_leases(store), housekeeping.LEFTOVER_GRACE_S, args.dry_run):
            print(f"{'would remove' if args.dry_run else 'removed'} {len(stale)} build lease(s) left by runs that "
                  "stopped more than an hour ago")
    if args.keep_versions is not None:
        versions = housekeeping.prune_registry(store, args.keep_versions, args.dry_run)
        print(housekeeping.format_registry_prune(versions, args.keep_versions, args.dry_run))
    return 0


def _fleet(args: argparse.Namespace) -> int:
    from grove.flows.fleet import FleetManifest

    manifest = FleetManifest.from_yaml(args.manifest)  # a GroveError is one line, from main
    _configure_logging(args.log_level)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.shell.server import ensure_api

    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        from grove.flows.fleet_refresh import fleet_refresh

        rows = fleet_refresh(manifest)
    print(f"\n{'model':<24} {'target':<12} {'status':<10} {'version':<17} reason")
    for row in rows:
        print(f"{row['model']:<24} {row['target']:<12} {row['status']:<10} {row['version']:<17} {row['reason']}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _deploy(args: argparse.Namespace) -> int:
    from grove.shell.deploy import deploy
    from grove.store import default_store_uri

    manifest = schedule = None
    if args.fleet_manifest:  # the user's input first: nothing is applied if any of it is wrong
        from grove.flows.fleet import FleetManifest
        from grove.shell.deploy import fleet_schedule

        manifest = FleetManifest.from_yaml(args.fleet_manifest).model_dump(mode="json")
        schedule = fleet_schedule(args.cron, args.timezone)
    elif args.cron or args.timezone:
        return _fail("--cron and --timezone schedule the fleet refresh: give the fleet with --fleet-manifest FILE")
    if not os.environ.get("PREFECT_API_URL"):
        return _fail("grove deploy needs a Prefect server: set PREFECT_API_URL (or run `grove stack up`)")
    from grove.shell.server import check_api

    check_api(os.environ["PREFECT_API_URL"])
    for name in deploy(args.store or default_store_uri(), manifest, schedule):
        print(f"deployed {name}")
    return 0


# Olive's short flags for finetune's options; the rest are --<field name>.
_FINETUNE_EPILOG = ("Every other --flag is one of transformers' TrainingArguments (--max_steps, --learning_rate, "
                    "--gradient_accumulation_steps, --num_train_epochs, --seed ...), as in Olive; Olive's defaults: "
                    "learning rate 2e-4, constant schedule, 3% warm-up. Speed defaults: see --torch_dtype; activation "
                    "checkpointing is off on a CPU (half the speed, for memory a small model does not need) and on "
                    "for CUDA.")


def _finetune_parser(sub: Any) -> None:
    """``grove finetune``: its flags are the request model's fields (one description for --help, the
    dashboard's form and the docs), with Olive's names, short flags and defaults."""
    from grove.flows.flags import finetune_flags

    p = sub.add_parser("finetune", help="LoRA fine-tuning of a model on a dataset (Olive's finetune)",
                       description="Trains a LoRA adapter (peft) as cached DAG nodes: prepare-data, train-adapter "
                       "(checkpoints in the store: a killed run resumes), evaluate-adapter. Writes Olive's layout: "
                       "<output>/adapter/, model_config.json, and grove_report.json.", epilog=_FINETUNE_EPILOG)
    _add_flags(p, finetune_flags(), types={"text_template": _unescaped})
    p.add_argument("-t", "--task", choices=["text-generation"], help="what the model is for (text-generation)")
    p.add_argument("--log_level", type=int, choices=range(5), default=1, help="as for auto-opt")
    p.add_argument("--dry_run", action="store_true", help="check every flag, print the request, run nothing")
    p.add_argument("--save_config_file", action="store_true", help="also write the request to "
                   "<output_path>/finetune_config.json, after the run")
    p.set_defaults(run=_finetune)


def _benchmark_parser(sub: Any) -> None:
    """``grove benchmark`` (Olive's): lm-evaluation-harness tasks on a model, its flags the request's fields."""
    from grove.flows.flags import benchmark_flags

    p = sub.add_parser("benchmark", help="score a model on lm-evaluation-harness tasks (Olive's benchmark)",
                       description="Runs lm-eval's tasks (mmlu, hellaswag, arc_easy..., or one's own with "
                       "--include_path) on a Hugging Face model (PyTorch) or an onnxruntime-genai folder (a grove "
                       "auto-opt output), as a cached node (evaluate-lm). Writes results.json (the harness's) and "
                       "grove_report.json.")
    _add_flags(p, benchmark_flags())
    p.add_argument("--log_level", type=int, choices=range(5), default=1, help="as for auto-opt")
    p.add_argument("--dry_run", action="store_true", help="check every flag, print the request, run nothing")
    p.set_defaults(run=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from grove.errors import one_line
    from grove.flows.request_benchmark import BenchmarkRequest

    fields = {k: v for k, v in vars(args).items() if k not in ("run", "log_level", "dry_run") and v is not None}
    try:
        request = BenchmarkRequest(**fields)
    except ValidationError as exc:
        return _fail(f"invalid request: {one_line(exc, lambda loc: f'--{loc[0]}: ' if loc else '')}")
    from grove.tasks.evaluate_lm import include_sha256

    include_sha256(request.include_path)  # a missing task folder: one line now, not after the model's download
    if args.dry_run:
        print(json.dumps(request.model_dump(mode="json"), indent=2))
        return 0
    _configure_logging(args.log_level)
    from grove.shell.local_run import run_benchmark

    report = run_benchmark(request)
    lines = [f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
             for task, metrics in cast(dict[str, dict[str, float]], report.get("metrics") or {}).items()]
    print("\n".join([f"lm-eval on {request.model_name_or_path} ({report.get('backend')}):", *lines,
                     f"written to {request.output_path}"]))
    return 0


def _add_flags(parser: argparse.ArgumentParser, flags: list[Flag],
               types: dict[str, Callable[[str], Any]] | None = None) -> None:
    """A request's flags (grove.flows.flags) as argparse arguments. Every default is None: the flags given
    are the fields set, and the request model supplies the rest."""
    groups: dict[str, Any] = {}
    for flag in flags:
        target = parser if flag.group is None else groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        text = flag.help.replace("%", "%%") + (f" (default: {flag.default})" if flag.default else "")
        options: dict[str, Any] = {"help": text, "default": None}
        if flag.switch is not None:
            options["action"] = "store_true" if flag.switch == "on" else argparse.BooleanOptionalAction
        else:
            options.update(required=flag.required, type=(types or {}).get(flag.name, flag.type))
            if flag.choices:
                options["choices"] = list(flag.choices)
            if flag.many:
                options["nargs"] = "+"
        target.add_argument(*flag.flags, **options)


def _unescaped(value: str) -> str:
    r"""A template as typed in a shell: ``\n`` is a newline, ``\t`` a tab (Olive's unescaped_str)."""
    return value.replace("\\n", "\n").replace("\\t", "\t")


def _training_flags(unknown: list[str]) -> dict[str, Any]:
    """The flags finetune's parser did not know, as {name: value}: ``--name value``, ``--name=value``,
    ``--flag`` alone (true), ``--name a b`` (a list). A stray value is an error."""
    flags: dict[str, Any] = {}
    name: str | None = None
    for token in unknown:
        if token.startswith("--") and len(token) > 2:
            name, _, value = token[2:].partition("=")
            name = name.replace("-", "_")
            flags[name] = value if value else True
            if value:
                name = None
        elif name is not None:
            current = flags[name]
            flags[name] = token if current is True else [*(current if isinstance(current, list) else [current]), token]
        else:
            raise GroveError(f"grove finetune: unexpected argument {token!r}; flags are --name value")
    return flags


def _finetune(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from grove.errors import one_line
    from grove.flows.request_finetune import FinetuneRequest

    skip = {"run", "log_level", "dry_run", "save_config_file", "task"}
    fields = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    try:
        request = FinetuneRequest(**fields)
        from grove.shell.local_run import preflight_finetune

        preflight_finetune(request)
    except ValidationError as exc:
        return _fail(f"invalid request: {one_line(exc, lambda loc: f'--{loc[0]}: ' if loc else '')}")
    if args.dry_run:
        print(json.dumps(request.model_dump(mode="json"), indent=2))
        return 0
    _configure_logging(args.log_level)
    from grove.shell.local_run import run_finetune

    try:
        report = run_finetune(request)
    except KeyboardInterrupt:
        print(f"grove: interrupted; {request.output_path} was left as it was, and the training's last checkpoint "
              "is in the store: the same command resumes from it", file=sys.stderr)
        return 130
    if args.save_config_file:
        from pathlib import Path

        (Path(request.output_path).expanduser() / "finetune_config.json").write_text(request.model_dump_json(indent=2))
    from grove.tasks._report_text import format_finetune_report

    print(format_finetune_report(report, request.output_path))
    return 0


def _fail(message: str) -> int:
    print(f"grove: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    entry()
