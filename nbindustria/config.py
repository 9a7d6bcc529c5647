"""Settings: where the cache lives, where its key lives, which engines to use.

Nothing is read at import time. Each setting is resolved when it is first needed, in this order:
an explicit argument, then an ``NBINDUSTRIA_*`` environment variable, then the user config file
written by ``nbindustria init``, then the built-in default.

=========================  ==========================================  ============================
setting                    environment variable                        default
=========================  ==========================================  ============================
cache directory            ``NBINDUSTRIA_CACHE_DIR``                   ``~/.cache/nbindustria``
key directory              ``NBINDUSTRIA_KEY_DIR``                     ``~/.local/share/nbindustria/keys``
engines                    ``NBINDUSTRIA_ENGINES``                     none (run in this process)
=========================  ==========================================  ============================
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import NbindustriaError

ENV_CACHE_DIR = "NBINDUSTRIA_CACHE_DIR"
ENV_KEY_DIR = "NBINDUSTRIA_KEY_DIR"
ENV_ENGINES = "NBINDUSTRIA_ENGINES"
ENV_CONFIG = "NBINDUSTRIA_CONFIG"


def _platform_dirs() -> tuple[Path, Path, Path]:
    import platformdirs  # imported here: keeps `import nbindustria` light

    return (Path(platformdirs.user_cache_dir("nbindustria")),
            Path(platformdirs.user_data_dir("nbindustria")),
            Path(platformdirs.user_config_dir("nbindustria")))


def config_file() -> Path:
    """The user config file that ``nbindustria init`` writes."""
    explicit = os.environ.get(ENV_CONFIG)
    return Path(explicit) if explicit else _platform_dirs()[2] / "config.json"


def _file_settings() -> dict[str, str]:
    path = config_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise NbindustriaError(f"cannot read the config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise NbindustriaError(f"the config file {path} must hold a JSON object (got {data!r})")
    return {str(k): str(v) for k, v in data.items()}


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    configured = _file_settings().get("cache_dir")
    if configured:
        return Path(configured).expanduser()
    return _platform_dirs()[0]


def key_dir() -> Path:
    """Where per-cache signing keys live: outside any cache dir, so copying a cache does not
    copy its key."""
    env = os.environ.get(ENV_KEY_DIR)
    if env:
        return Path(env).expanduser()
    configured = _file_settings().get("key_dir")
    if configured:
        return Path(configured).expanduser()
    return _platform_dirs()[1] / "keys"


def parse_engines(value: object) -> int | str | None:
    """Normalize an engines setting: None (in-process), a count, "auto", or a profile name."""
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool):
        raise NbindustriaError(f"'engines' must be a count, 'auto' or a profile name (got {value!r})")
    if isinstance(value, int):
        if value < 0:
            raise NbindustriaError(f"'engines' must be a positive count (got {value!r})")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text) or None
        if text.lower() in ("local", "none", "kernel"):
            return None
        return text
    raise NbindustriaError(f"'engines' must be a count, 'auto' or a profile name (got {value!r})")


def default_engines() -> int | str | None:
    env = os.environ.get(ENV_ENGINES)
    if env:
        return parse_engines(env)
    return parse_engines(_file_settings().get("engines"))


def write_config(**settings: str) -> Path:
    """Write settings to the user config file (used by ``nbindustria init``)."""
    path = config_file()
    current = _file_settings()
    current.update({k: v for k, v in settings.items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Settings:
    """Resolved settings of one pipeline."""

    cache_dir: Path
    engines: int | str | None

    @classmethod
    def resolve(cls, cache_dir: str | os.PathLike[str] | None = None,
                engines: object = None) -> Settings:
        return cls(
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
            engines=parse_engines(engines) if engines is not None else default_engines(),
        )
