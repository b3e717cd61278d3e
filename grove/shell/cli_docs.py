"""The flag tables of docs/cli.md, generated from the requests' fields (grove.flows.flags), so that a
flag's text has one home. After changing a field: ``python -m grove.shell.cli_docs`` rewrites them;
tests/shell/test_cli_docs.py fails while the file is out of date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grove.flows.flags import Flag, auto_opt_flags, benchmark_flags, finetune_flags

__all__ = ["DOC", "render", "table"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
_BLOCK = re.compile(r"(<!-- flags (?P<name>[\w-]+): generated[^>]*-->\n)(?P<body>.*?)(<!-- /flags (?P=name) -->)",
                    re.S)


def _spelled(flag: Flag) -> str:
    if flag.switch == "on_off":
        return f"--{flag.name}` / `--no-{flag.name}"
    names = "/".join(flag.flags)
    if flag.switch == "on":
        return names
    if flag.choices:
        return f"{names} {{{','.join(str(c) for c in flag.choices)}}}"
    if flag.many:
        return f"{names} {'JSON' if flag.name.endswith('_definitions') else 'NAME'}..."
    value = {int: "N", float: "X"}.get(flag.type or str) or ("PATH" if flag.name.endswith(("_path", "_or_path")) else
                                                      "FILE" if flag.name.endswith("_data") else "VALUE")
    return f"{names} {value}"


def table(flags: list[Flag]) -> str:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for flag in flags:
        default = "required" if flag.required else (flag.default or "")
        meaning = flag.help.replace("|", r"\|")
        rows.append(f"| `{_spelled(flag)}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _tables() -> dict[str, str]:
    auto = auto_opt_flags()
    return {"auto-opt": table([f for f in auto if f.group is None]),
            "auto-opt-encoders": table([f for f in auto if f.group is not None]),
            "finetune": table(finetune_flags()), "benchmark": table(benchmark_flags())}


def render(text: str) -> str:
    """``text`` (docs/cli.md) with each generated block rewritten from the fields."""
    tables = _tables()
    return _BLOCK.sub(lambda m: m.group(1) + tables[m.group("name")] + m.group(4), text)


def main() -> int:
    text = DOC.read_text()
    new = render(text)
    if new != text:
        DOC.write_text(new)
    print(f"{DOC}: {'rewritten' if new != text else 'up to date'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
