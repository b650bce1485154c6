"""Shared checks of the method tests."""

import pytest

from erasure.config import ConfigError, load_config
from erasure.train import main


def assert_bad_setting(recipe: str, arguments: list[str], message: str, output, capsys) -> None:
    """``recipe`` with ``arguments`` is refused at configuration time with one line holding
    ``message``; the command line exits with 2, prints one error line and writes nothing."""
    with pytest.raises(ConfigError) as error:
        load_config([f"recipe={recipe}", *arguments])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert main([f"recipe={recipe}", *arguments, f"output_dir={output}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and not output.exists()
