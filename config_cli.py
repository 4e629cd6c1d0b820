"""Run configs from the command line: `path.py[:arg]` files, `--config.<field>=<value>` overrides.

The command-line layer of the scripts (train.py, sweep.py) and of the studies' and benchmarks'
command lines, so it lives beside the scripts rather than in the `lra` library; it is installed as
a top-level module so that installed studies and benchmarks find it. Each mistake (a missing
file, a file without `get_config`, a bad arg, an unknown field, a value of the wrong type) raises
`ConfigError` with one message naming it, which the scripts print as one line (`run`). Overrides
are typed by the field they replace, as `ml_collections.config_flags` types them. Importing this
module imports neither JAX nor TensorFlow.
"""
import importlib.util
import os
import pathlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags

_PREFIX = '--config.'
# Parsers of override values by the type of the field they replace.
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
            str: flags.ArgumentParser()}

Overrides = Sequence[tuple[str, str]]


class ConfigError(ValueError):
  """A config file, its arg or an override is wrong; the message says which and why."""


def _load_module(path: str) -> types.ModuleType:
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _call(config_spec: str, function: str) -> Any:
  """`function(arg)` of the config file named by `config_spec` ('path.py[:arg]')."""
  path, _, arg = config_spec.partition(':')
  module = _load_module(path)
  if not callable(getattr(module, function, None)):
    raise ConfigError(f'config file {path!r} defines no {function}(arg).')
  try:
    return getattr(module, function)(arg or None)
  except ValueError as error:
    raise ConfigError(f'--config={config_spec}: {error}') from None


def get_config(config_spec: str, overrides: Overrides = ()) -> ml_collections.ConfigDict:
  """The locked config of `config_spec` ('configs/listops.py:topk,k=64') with `overrides`.

  Args:
    config_spec: a config file, optionally followed by ':' and the arg of its `get_config`.
    overrides: (dotted field, value text) pairs, applied in order (see `apply_overrides`).

  Raises:
    ConfigError: on a missing file or function, a bad arg, or a bad override.
  """
  config = _call(config_spec, 'get_config')
  apply_overrides(config, overrides)
  return config


def get_sweep(config_spec: str) -> list[dict[str, Any]]:
  """`get_sweep(arg)` of the config file: override dicts, one per point."""
  return _call(config_spec, 'get_sweep')


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.<field>=<value>` (or `--config.<field> <value>`) from other arguments.

  Returns:
    (the other arguments in order, the (field, value text) pairs in order).
  """
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if not arg.startswith(_PREFIX):
      rest.append(arg)
      continue
    field, has_value, value = arg[len(_PREFIX):].partition('=')
    if not has_value:
      value = next(args, None)
      if value is None or value.startswith('--'):
        raise ConfigError(f'{arg} has no value; write {arg}=VALUE.')
    overrides.append((field, value))
  return rest, overrides


def _holder(config: ml_collections.ConfigDict, field: str) -> tuple[Any, str]:
  """The group that holds dotted `field`, and the field's last name."""
  *groups, name = field.split('.')
  holder, where = config, 'config'
  for group in groups:
    if not isinstance(holder.get(group), ml_collections.ConfigDict):
      break
    holder, where = holder[group], f'{where}.{group}'
  else:
    if name in holder:
      return holder, name
  raise ConfigError(f'--config.{field}: no such field; the fields of {where} are '
                    f'{sorted(holder.keys())}.')


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> None:
  """Sets each dotted field of `overrides` to its value text, parsed as the field's type.

  Booleans take true/false/1/0, ints and floats their Python forms, strings the text itself.

  Raises:
    ConfigError: on an unknown field, a group, or text that is not a value of the field's type.
  """
  for field, text in overrides:
    holder, name = _holder(config, field)
    kind = type(holder[name])
    if kind not in _PARSERS:
      raise ConfigError(f'--config.{field}: cannot override a field of type {kind.__name__} '
                        'from the command line.')
    try:
      value = _PARSERS[kind].parse(text)
    except ValueError:
      raise ConfigError(f'--config.{field}={text!r}: expected {kind.__name__}.') from None
    holder[name] = value


def run(main: Callable[[list[str], list[tuple[str, str]]], None]) -> None:
  """`absl.app.run` for a script that takes `--config.<field>=<value>` overrides.

  The overrides are taken out of argv before absl parses the script's own flags and are passed
  to `main(argv, overrides)`; a `ConfigError` ends the program with one line naming the script
  and the mistake, and exit status 1.
  """
  overrides: list[tuple[str, str]] = []
  program = os.path.basename(sys.argv[0])

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      rest, found = split_overrides(argv)
    except ConfigError as error:
      sys.exit(f'{program}: {error}')
    overrides.extend(found)
    return app.parse_flags_with_usage(rest)

  def main_with_overrides(argv: list[str]) -> None:
    try:
      main(argv, overrides)
    except ConfigError as error:
      sys.exit(f'{program}: {error}')

  app.run(main_with_overrides, flags_parser=parse_flags)
