"""The plugin manifest's `[config]` values.

They come from `wasi:cli/environment` at request time. `os.environ` does not have them: it
was filled when the plugin was pre-initialized at build time."""

from wit_world.imports import environment as _environment


def config(name, default=None):
    """The manifest's `[config]` value `name`, or `default`."""
    for key, value in _environment.get_environment():
        if key == name:
            return value
    return default


def all_config():
    return dict(_environment.get_environment())
