"""The README's command examples must parse with today's CLI: a renamed or removed flag fails here,
not in a reader's terminal."""
import os
import re
import shlex
from pathlib import Path

import pytest

from gptlab.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            cmds += [part.strip() for part in line.split("&&") if part.strip().startswith("gptlab ")]
    return cmds


def test_readme_has_command_examples():
    assert len(readme_commands()) > 20


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_parses(cmd):
    argv = [os.path.expanduser(a) for a in shlex.split(cmd)[1:]]
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        assert not e.code, f"README example no longer parses: {cmd}"
