"""Finding and loading experiments: any config file, a listing, and a check of --config.

An experiment is a Python file that defines `get_config(arg='')` (and `run`, `PRESETS`, ...;
README "Adding an experiment"). `--config` takes any such file, relative to the current
directory or else to the repository root `root`; `--list` shows the ones in `root/experiments/`.
Listing reads the files with `ast`, so it imports no experiment (nor JAX).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys

from maskax.training import runs


def experiment_files(root: str) -> dict[str, str]:
  """Name -> path of every file in root/experiments/ that defines `get_config` (common.py, shared
  defaults, does not). Read with `ast`, so that listing imports no experiment (nor JAX)."""
  found, folder = {}, os.path.join(root, "experiments")
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.endswith(".py") and any(
      isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in _parse(path).body
    ):
      found[name[:-3]] = path
  return found


def _parse(path: str) -> ast.Module:
  with open(path) as f:
    return ast.parse(f.read(), path)


def list_experiments(root: str) -> str:
  """Every experiment with its presets and the question it answers."""
  lines = []
  for name, path in experiment_files(root).items():
    tree = _parse(path)
    purpose = (ast.get_docstring(tree) or "").strip().splitlines()[:1]
    lines.append(f"{name}: {''.join(purpose)}")
    lines += [f"    :{preset:<10} {text}" for preset, text in _presets(tree, path, root).items()]
  return "\n".join(lines)


def _presets(tree: ast.Module, path: str, root: str) -> dict[str, str]:
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      getattr(t, "id", None) == "PRESETS" for t in node.targets
    ):
      try:
        return ast.literal_eval(node.value)
      except ValueError:  # built by code: import the module to read it
        return load_experiment(path, root).PRESETS
  return {}


def resolve_config_path(path: str, root: str) -> str | None:
  """`path` relative to the current directory, else to the repository root (None: neither)."""
  for candidate in (path, os.path.join(root, path)):
    if os.path.isfile(candidate):
      return os.path.realpath(candidate)
  return None


def load_experiment(path: str, root: str):
  """The module of the config file `path`.

  A file in experiments/ is imported as `experiments.NAME`, the module tests and benchmarks
  import too; any other file under a name of its own. The repository root goes on sys.path
  either way, so that a config file anywhere can `from experiments import common`.
  """
  if root not in sys.path:
    sys.path.insert(0, root)
  path = os.path.realpath(path)
  name = os.path.splitext(os.path.basename(path))[0]
  if os.path.dirname(path) == os.path.realpath(os.path.join(root, "experiments")):
    return importlib.import_module(f"experiments.{name}")
  module_name = f"maskax_config_{name}"
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look modules up by name
    spec.loader.exec_module(module)
  return sys.modules[module_name]


def config_arg(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_config_arg(argv, value: str) -> list[str]:
  """A copy of `argv` whose --config (`--config=V` or `--config V`) holds `value`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = f"--config={value}"
      break
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = value
      break
  return out


def precheck_config_arg(argv, root: str) -> list[str]:
  """`argv` with --config's file made absolute (ml_collections reads it relative to the current
  directory only); exits with what exists when --config names a missing file, preset or key."""
  value = config_arg(argv)
  if value is None:
    return list(argv)
  path, _, preset = value.partition(":")
  resolved = resolve_config_path(path, root)
  if resolved is None:
    sys.exit(
      f"error: unknown experiment {path!r} (no such file here or under {root}). "
      "Experiments: "
      + ", ".join(os.path.relpath(p, root) for p in experiment_files(root).values())
      + " (see --list)."
    )
  module = load_experiment(resolved, root)
  name = os.path.splitext(os.path.basename(resolved))[0]
  if not callable(getattr(module, "get_config", None)):
    sys.exit(f"error: {path} defines no get_config(arg=''): it is not an experiment.")
  presets = getattr(module, "PRESETS", None)
  if preset and presets is not None and preset not in presets:
    sys.exit(
      f"error: experiment {name!r} has no preset {preset!r}. Presets: "
      + ", ".join(presets)
      + f" (use --config={path}:PRESET or no preset)."
    )
  try:
    known_keys = runs.flatten(module.get_config(preset).to_dict())
  except ValueError as e:  # e.g. an unknown preset of a config without PRESETS
    sys.exit(f"error: {e}")
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config.") :].split("=", 1)[0]
      if key not in known_keys and not any(k.startswith(key + ".") for k in known_keys):
        leaf = key.split(".")[-1]
        close = [k for k in known_keys if k.split(".")[-1][:3] == leaf[:3]]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        sys.exit(
          f"error: unknown config key {key!r} for {name}.{hint} "
          f"All keys: see get_config() in {resolved}."
        )
  return _with_config_arg(argv, f"{resolved}:{preset}" if preset else resolved)
