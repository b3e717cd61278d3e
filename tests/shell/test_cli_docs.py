"""One home per flag: auto-opt's and finetune's flags are their requests' fields, and docs/cli.md's flag
tables are generated from them (`python -m grove.shell.cli_docs` after changing a field)."""

from __future__ import annotations

import argparse

from grove.flows.flags import auto_opt_flags, finetune_flags
from grove.flows.request import AutoOptRequest
from grove.flows.request_encoder import EncoderOptRequest
from grove.shell import cli, cli_docs


def _options(command: str) -> dict[str, argparse.Action]:
    (sub,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a for a in sub.choices[command]._actions if a.option_strings}


def test_docs_cli_md_is_generated_from_the_fields() -> None:
    text = cli_docs.DOC.read_text()
    assert cli_docs.render(text) == text, "docs/cli.md is out of date: run python -m grove.shell.cli_docs"
    for flag in auto_opt_flags() + finetune_flags():
        assert f"--{flag.name}" in text, flag.name


def test_auto_opt_takes_every_field_a_user_sets_with_its_description() -> None:
    options = _options("auto-opt")
    fields = {**EncoderOptRequest.model_fields, **AutoOptRequest.model_fields}
    settable = set(fields) - {"publish_as", "gpu_nodes", "threads"}
    assert set(options) - {"help", "log_level"} == settable
    assert options["model_name_or_path"].option_strings == ["-m", "--model_name_or_path"]
    assert AutoOptRequest.model_fields["head_bits"].description in options["head_bits"].help % {}  # argparse's %%
    assert options["block_size"].choices == [16, 32, 64, 128, 256] and options["block_size"].type is int
    assert options["per_channel"].option_strings == ["--per_channel", "--no-per_channel"]
    assert all(a.default is None for dest, a in options.items() if dest not in ("help", "log_level")), \
        "a flag not given is a field not set: the request's default applies"


def test_finetune_takes_every_field_but_the_training_arguments() -> None:
    from grove.flows.request_finetune import FinetuneRequest

    options = _options("finetune")
    assert {f.name for f in finetune_flags()} == set(FinetuneRequest.model_fields) - {"training_args"}
    assert {f.name for f in finetune_flags()} <= set(options)
    assert options["data_name"].option_strings == ["-d", "--data_name"] and options["data_name"].required
    assert "(default: 64)" in options["lora_r"].help
