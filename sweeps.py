"""Sweeps of train.py runs: expanding a config's points, launching them with submitit, reading back
their state and tabulating their results. sweep.py is the command line.

Every point is one `train.py` run in its own workdir, `<root>/<point name>`, so a point keeps its
resume, lock and results exactly as a lone run does; submitit's files for the point (submission
script, pickles, logs) go to `<root>/<point name>/submitit`. `<root>/sweep.json` records what was
launched, so that `read_status(root)` needs nothing but the root.

Preemption and timeouts: a point's job is a `TrainPoint`, a checkpointable submitit callable. On
submitit's preemption signal it stops its train.py child with SIGTERM (train.py then saves a
checkpoint of the current step, data state included) and resubmits itself; the requeued job starts
train.py again, which resumes from the workdir as any rerun does.
"""
import csv
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import submitit
from submitit.core.utils import JobPaths

import config_cli

SUBMITIT_DIR = 'submitit'
SWEEP_FILE = 'sweep.json'
LAUNCHERS = ('local', 'slurm')
_SPLITS = ('validation', 'test')
_METRICS = ('accuracy', 'loss')
_REPO = os.path.dirname(os.path.abspath(__file__))
# A local "job" has no time limit of its own: submitit's default (minutes) would stop long runs.
_LOCAL_TIMEOUT_MIN = 60 * 24 * 365
# Options that have their own sweep.py flag, so that each fact is given in one place.
_DEDICATED_SBATCH_OPTIONS = {'partition': '--slurm_partition', 'time': '--slurm_time',
                             'nodes': '--nodes_per_point', 'gpus-per-node': '--gpus_per_point',
                             'ntasks-per-node': '--nodes_per_point', 'job-name': None,
                             'output': None, 'error': None, 'signal': None, 'open-mode': None}


class SweepError(config_cli.ConfigError):
  """A sweep cannot start or be read; the message names the flag, point or file and why."""


class Point(NamedTuple):
  """One sweep point: its workdir name and its own (field -> value) overrides."""

  name: str
  overrides: dict[str, Any]


def point_name(overrides: dict[str, Any]) -> str:
  """Short workdir name of a sweep point, e.g. 'topk_k64_c1024'."""
  abbreviations = {'attention.k': 'k', 'attention.query_chunk_size': 'c'}
  parts = [str(overrides.get('attention.kind', 'point'))]
  parts += [f'{abbreviations.get(key, key.replace(".", "-"))}{value}'
            for key, value in overrides.items() if key != 'attention.kind']
  return '_'.join(parts)


def point_overrides(shared: config_cli.Overrides, point: dict[str, Any]
                    ) -> list[tuple[str, str]]:
  """The (field, value text) overrides of one point: the shared ones, then the point's own."""
  return list(shared) + [(key, str(value)) for key, value in point.items()]


def train_flags(config_spec: str, overrides: config_cli.Overrides, workdir: str) -> list[str]:
  """The train.py flags of one sweep point with `overrides` (see `point_overrides`)."""
  return ([f'--config={config_spec}', f'--workdir={workdir}']
          + [f'--config.{key}={value}' for key, value in overrides])


def expand(config_spec: str, shared: config_cli.Overrides = ()) -> list[Point]:
  """The points of `config_spec`'s `get_sweep`, each checked as the full config it trains.

  A shared override of a swept field pins that axis, as a `k=` in the config arg does: every point
  takes the shared value (points that become equal are kept once), because the point's own value
  would otherwise win over it and the shared value would never run.

  Raises:
    config_cli.ConfigError: the config or an override does not load, or a point's config has a
      bad value (checked by `lra.build.build`, which reads no data); the message names the point.
  """
  base = config_cli.get_config(config_spec, shared)
  from lra.build import build  # imports JAX, which a config mistake found above need not wait for
  shared_fields = {field for field, _ in shared}
  points = []
  for own in config_cli.get_sweep(config_spec):
    pinned = {key: _field(base, key) if key in shared_fields else value
              for key, value in own.items()}
    if pinned not in points:
      points.append(pinned)
  named = [Point(point_name(point), point) for point in points]
  for name, point in named:
    config = config_cli.get_config(config_spec, point_overrides(shared, point))
    try:
      build(config)
    except ValueError as error:
      raise config_cli.ConfigError(f'sweep point {name}: {error}') from None
  return named


def _field(config: Any, dotted: str) -> Any:
  for part in dotted.split('.'):
    config = config[part]
  return config


# ----------------------------------------------------------------------------- jobs


class PointFailed(RuntimeError):
  """train.py ended with a non-zero status; the message holds its last error line."""


class TrainPoint(submitit.helpers.Checkpointable):
  """A submitit job that runs one train.py command (in every task of the job).

  `env` changes the child's environment: a value replaces the variable, None removes it. Local
  points set CUDA_VISIBLE_DEVICES through it: submitit's local executor exports its own (empty
  for a job without GPUs), and a point on a machine without GPUs should run as a plain train.py
  run does, with the variable unset.
  """

  def __init__(self, command: list[str], env: dict[str, str | None] | None = None):
    self.command = command
    self.env = dict(env or {})
    self._process: subprocess.Popen | None = None

  def __call__(self) -> int:
    env = dict(os.environ)
    for name, value in self.env.items():
      if value is None:
        env.pop(name, None)
      else:
        env[name] = value
    # SLURM may send the preemption notice to every process of the job step; train.py must stop
    # on SIGTERM (saving a checkpoint), not die of a signal meant for submitit. The child starts
    # with the notice blocked (a signal mask survives exec), and this process gets a notice sent
    # meanwhile once it unblocks it.
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {submitit.JobEnvironment._usr_sig()})
    try:
      self._process = subprocess.Popen(self.command, env=env, stderr=subprocess.PIPE, text=True,
                                       errors='replace')
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    # Copied in a thread: submitit's notice handler waits for train.py in this one, and a pipe
    # nobody read meanwhile would stall train.py's last log lines.
    last_line = ['']
    copier = threading.Thread(target=_copy_lines, args=(self._process.stderr, last_line),
                              daemon=True)
    copier.start()
    returncode = self._process.wait()
    copier.join()
    if returncode:
      how = (f'was stopped by {signal.Signals(-returncode).name}' if returncode < 0
             else f'exited with status {returncode}')
      raise PointFailed(f'train.py {how}: {last_line[0]}')
    return returncode

  def checkpoint(self) -> submitit.helpers.DelayedSubmission:
    """Stops train.py the way a rerun can resume (SIGTERM: it checkpoints the current step) and
    resubmits the same command."""
    if self._process is not None and self._process.poll() is None:
      self._process.send_signal(signal.SIGTERM)
      try:
        self._process.wait(timeout=60)  # within submitit's signal lead time (90 s)
      except subprocess.TimeoutExpired:
        pass  # the job ends anyway; the requeued run resumes from the last saved checkpoint
    return submitit.helpers.DelayedSubmission(TrainPoint(self.command, self.env))

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_process': None}


def _copy_lines(stream: Any, last_line: list[str]) -> None:
  """Copies `stream` to stderr, keeping its last non-empty line in `last_line[0]`."""
  for line in stream:
    sys.stderr.write(line)
    sys.stderr.flush()
    last_line[0] = line.strip() or last_line[0]


class SlurmOptions(NamedTuple):
  """What each point's SLURM job asks for."""

  partition: str | None
  time_min: int
  nodes: int
  extra: dict[str, str]


def parse_slurm_extra(items: Sequence[str]) -> dict[str, str]:
  """`key=value` items (sbatch long options without the dashes) as a dict.

  Raises:
    SweepError: an item without '=', or an option that has its own flag or is set by submitit.
  """
  extra = {}
  for item in items:
    key, has_value, value = item.partition('=')
    key = key.strip().lstrip('-')
    if not has_value or not key:
      raise SweepError(f'--slurm_extra={item!r}: expected key=value (an sbatch option without '
                       'its dashes, e.g. account=proj).')
    if key.replace('_', '-') in _DEDICATED_SBATCH_OPTIONS:
      flag = _DEDICATED_SBATCH_OPTIONS[key.replace('_', '-')]
      raise SweepError(f'--slurm_extra={item!r}: ' + (
          f'use {flag} instead.' if flag else 'submitit sets this sbatch option itself.'))
    extra[key] = value
  return extra


def visible_gpus() -> list[str]:
  """The GPUs local points are spread over: CUDA_VISIBLE_DEVICES's if set, else nvidia-smi's,
  else none. Found without starting JAX, which would take GPU memory in the sweep process."""
  if 'CUDA_VISIBLE_DEVICES' in os.environ:
    return [gpu for gpu in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if gpu.strip()]
  if shutil.which('nvidia-smi') is None:
    return []
  listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False)
  return [str(i) for i, line in enumerate(
      line for line in listing.stdout.splitlines() if line.startswith('GPU '))]


def slot_gpus(gpus: Sequence[str], slot: int, per_point: int) -> list[str]:
  """The GPUs of local slot `slot`: `per_point` of `gpus`, round robin from slot * per_point."""
  return [gpus[(slot * per_point + i) % len(gpus)] for i in range(per_point)] if gpus else []


def _write_sweep_file(root: str, config_spec: str, shared: config_cli.Overrides,
                      points: Sequence[Point], launcher: str) -> None:
  """Records the sweep in `root`, refusing a root that holds a sweep of other settings (a rerun
  skips finished points, whose results would then belong to other settings)."""
  sweep = {'config': config_spec, 'shared': [list(o) for o in shared],
           'points': [{'name': p.name, 'overrides': p.overrides} for p in points]}
  path = os.path.join(root, SWEEP_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    if {key: previous.get(key) for key in sweep} != json.loads(json.dumps(sweep)):
      raise SweepError(f'--workdir_root={root} holds a sweep of other settings (--config='
                       f'{previous.get("config")}, overrides {previous.get("shared")}); choose '
                       'another --workdir_root.')
  os.makedirs(root, exist_ok=True)
  with open(path, 'w') as f:
    json.dump({**sweep, 'launcher': launcher}, f, indent=2)
    f.write('\n')


def _command(train_py: str, config_spec: str, shared: config_cli.Overrides, point: Point,
             root: str, multiprocess: bool = False) -> list[str]:
  flags = train_flags(config_spec, point_overrides(shared, point.overrides),
                      os.path.join(root, point.name))
  return [sys.executable, train_py] + flags + (['--multiprocess'] if multiprocess else [])


def _setup() -> list[str]:
  """Shell lines before each job: submitit's runner unpickles `TrainPoint`, so it imports lra."""
  return [f'export PYTHONPATH={_REPO}${{PYTHONPATH:+:$PYTHONPATH}}']


def _is_done(root: str, name: str) -> bool:
  return os.path.isfile(os.path.join(root, name, 'results.json'))


def run_local(train_py: str, config_spec: str, shared: config_cli.Overrides,
              points: Sequence[Point], root: str, parallel: int = 1,
              gpus_per_point: int = 1, poll_s: float = 1.0) -> dict[str, str]:
  """Trains the points on this machine, `parallel` at a time, each a submitit local job.

  Points that are done (results.json) are skipped; the others start or resume in their workdirs.
  With GPUs visible, each running point sees its own `gpus_per_point` of them.

  Returns:
    The failed points' names -> their error lines (empty when all finished).
  Raises:
    SweepError: on a bad `parallel` or `gpus_per_point`.
  """
  if parallel < 1:
    raise SweepError(f'--parallel={parallel}; expected an int >= 1.')
  gpus = visible_gpus()
  if gpus_per_point < 1 or (gpus and gpus_per_point > len(gpus)):
    most = f' and at most the {len(gpus)} visible GPUs' if gpus else ''
    raise SweepError(f'--gpus_per_point={gpus_per_point}; expected an int >= 1{most}.')
  _write_sweep_file(root, config_spec, shared, points, 'local')
  pending = [p for p in points if not _is_done(root, p.name)]
  for point in points:
    if point not in pending:
      print(f'{point.name}: done already, skipped', flush=True)
  free = list(range(parallel))
  running: dict[str, tuple[Any, int]] = {}
  failed = {}
  while pending or running:
    while pending and free:
      point, slot = pending.pop(0), free.pop(0)
      devices = slot_gpus(gpus, slot, gpus_per_point)
      env = {'CUDA_VISIBLE_DEVICES': ','.join(devices) if devices else None}
      executor = submitit.LocalExecutor(os.path.join(root, point.name, SUBMITIT_DIR))
      executor.update_parameters(timeout_min=_LOCAL_TIMEOUT_MIN, setup=_setup())
      job = executor.submit(TrainPoint(_command(train_py, config_spec, shared, point, root), env))
      on = f'GPU {",".join(devices)}' if devices else 'no GPU'
      print(f'{point.name}: started (local job {job.job_id}, {on})', flush=True)
      running[point.name] = (job, slot)
    time.sleep(poll_s)
    for name, (job, slot) in list(running.items()):
      if job.done():
        del running[name]
        free.append(slot)
        error = _job_error(job.paths)
        if error is None:
          print(f'{name}: done', flush=True)
        else:
          failed[name] = error
          print(f'{name}: failed: {error}', file=sys.stderr, flush=True)
  return failed


def submit_slurm(train_py: str, config_spec: str, shared: config_cli.Overrides,
                 points: Sequence[Point], root: str, options: SlurmOptions,
                 gpus_per_point: int = 1) -> dict[str, str]:
  """Submits one SLURM job per point that is not done; returns point name -> job id.

  A point of several nodes runs one task per node, each a `train.py --multiprocess`
  (`jax.distributed.initialize` finds the processes from SLURM's variables).

  Raises:
    SweepError: there is no sbatch or srun here, a value is out of range, or sbatch refuses a job.
  """
  for program in ('sbatch', 'srun'):
    if shutil.which(program) is None:
      raise SweepError(f'--launcher=slurm: `{program}` is not on PATH, so this machine cannot '
                       'submit SLURM jobs; run sweep.py on a SLURM login node, or use '
                       '--launcher=local.')
  if options.nodes < 1 or options.time_min < 1 or gpus_per_point < 0:
    raise SweepError(f'--nodes_per_point={options.nodes}, --slurm_time={options.time_min}, '
                     f'--gpus_per_point={gpus_per_point}: expected nodes and time >= 1, gpus >= 0.')
  _write_sweep_file(root, config_spec, shared, points, 'slurm')
  jobs = {}
  for point in points:
    if _is_done(root, point.name):
      print(f'{point.name}: done already, skipped', flush=True)
      continue
    executor = submitit.SlurmExecutor(os.path.join(root, point.name, SUBMITIT_DIR))
    executor.update_parameters(
        job_name=point.name, partition=options.partition, time=options.time_min,
        nodes=options.nodes, ntasks_per_node=1, gpus_per_node=gpus_per_point or None,
        setup=_setup(), additional_parameters=options.extra)
    command = _command(train_py, config_spec, shared, point, root, options.nodes > 1)
    try:
      job = executor.submit(TrainPoint(command))
    except (submitit.core.utils.FailedJobError,
            submitit.core.utils.FailedSubmissionError) as error:  # sbatch's status, its output
      lines = str(error).strip().splitlines() or ['(no output)']
      raise SweepError(f'sbatch refused point {point.name}: {lines[-1]}') from None
    jobs[point.name] = job.job_id
    print(f'{point.name}: submitted (SLURM job {job.job_id})', flush=True)
  return jobs


# ----------------------------------------------------------------------------- status


class PointState(NamedTuple):
  """What a point's workdir says: state is pending, running, done or failed; step is the last
  logged train step (None before the first); detail is a failed point's last error line."""

  state: str
  step: int | None = None
  detail: str = ''

  def __str__(self) -> str:
    at = f' at step {self.step}' if self.step is not None and self.state != 'done' else ''
    return f'{self.state}{at}' + (f': {self.detail}' if self.detail else '')


def _last_step(workdir: str) -> int | None:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  steps = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line being written
      if record.get('split') == 'train':
        steps.append(record['step'])
  return max(steps, default=None)


def _latest_job(workdir: str) -> JobPaths | None:
  """The paths of the point's last submitted job, by the time its submission was written."""
  folder = os.path.join(workdir, SUBMITIT_DIR)
  if not os.path.isdir(folder):
    return None
  pickles = [name for name in os.listdir(folder) if name.endswith('_submitted.pkl')]
  if not pickles:
    return None
  latest = max(pickles, key=lambda name: os.path.getmtime(os.path.join(folder, name)))
  return JobPaths(folder, job_id=latest[:-len('_submitted.pkl')], task_id=0)


def _job_error(paths: JobPaths) -> str | None:
  """A finished job's error line (its exception's message), None if it succeeded, and the end of
  its log if it ended without a result (killed)."""
  if paths.result_pickle.exists():
    with open(paths.result_pickle, 'rb') as f:
      outcome, value = pickle.load(f)
    if outcome == 'success':
      return None
    last = value.strip().splitlines()[-1]
    return last.split(': ', 1)[1] if last.startswith(PointFailed.__module__) else last
  log = paths.stderr
  lines = log.read_text(errors='replace').strip().splitlines() if log.exists() else []
  return f'ended without a result; last log line: {lines[-1] if lines else "(none)"}'


def _job_alive(launcher: str, paths: JobPaths) -> bool | None:
  """Whether the job still runs (or waits in SLURM's queue); None when this host cannot tell."""
  if launcher == 'local':
    try:
      os.kill(int(paths.job_id), 0)  # a local job's id is its controller's pid
    except ProcessLookupError:
      return False
    except PermissionError:
      pass
    return True
  if shutil.which('sacct') is None:
    return None
  state = submitit.SlurmJob(paths.folder, paths.job_id).state
  return state in ('PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'RESIZING',
                   'SUSPENDED', 'UNKNOWN')


def point_state(workdir: str, launcher: str = 'local') -> PointState:
  """The state of the point trained in `workdir`, from the files it holds (see `PointState`)."""
  step = _last_step(workdir)
  if os.path.isfile(os.path.join(workdir, 'results.json')):
    return PointState('done', step)
  paths = _latest_job(workdir)
  if paths is None:
    return PointState('pending', step)
  if not paths.result_pickle.exists() and _job_alive(launcher, paths) is not False:
    started = paths.stderr.exists() or step is not None
    return PointState('running' if started else 'pending', step)
  error = _job_error(paths)
  return PointState('failed', step, error or 'train.py wrote no results.json')


def read_sweep(root: str) -> dict[str, Any]:
  """The sweep.json that launching wrote in `root`.

  Raises:
    SweepError: there is none (nothing was launched there).
  """
  path = os.path.join(root, SWEEP_FILE)
  if not os.path.isfile(path):
    raise SweepError(f'--workdir_root={root}: no {SWEEP_FILE} there; is it the root of a sweep '
                     'launched with --launcher?')
  with open(path) as f:
    return json.load(f)


def read_status(root: str) -> list[tuple[Point, PointState]]:
  """Each point of the sweep launched in `root` with its state."""
  sweep = read_sweep(root)
  points = [Point(p['name'], p['overrides']) for p in sweep['points']]
  return [(p, point_state(os.path.join(root, p.name), sweep['launcher'])) for p in points]


# ----------------------------------------------------------------------------- summary


def summarize(points: Sequence[Point], workdir_root: str, launcher: str = 'local'
              ) -> list[dict[str, Any]]:
  """Writes summary.csv, summary.md and accuracy_vs_k.png under `workdir_root`; returns the rows.

  Args:
    points: the sweep points; point `name` ran in `workdir_root/name`.
    workdir_root: parent of the per-point workdirs.
    launcher: how the points were launched (to tell a running job from a dead one).

  Returns:
    One row per point: name, the overrides, its state (`PointState`, with a failed point's error
    line), then `<split>_<metric>` for validation/test accuracy/loss, empty where the point has
    no results.json.
  """
  os.makedirs(workdir_root, exist_ok=True)
  keys = list(dict.fromkeys(key for _, overrides in points for key in overrides))
  rows = []
  for name, overrides in points:
    workdir = os.path.join(workdir_root, name)
    row = {'name': name, **{key: overrides.get(key, '') for key in keys},
           'state': str(point_state(workdir, launcher))}
    path = os.path.join(workdir, 'results.json')
    results = {}
    if os.path.isfile(path):
      with open(path) as f:
        results = json.load(f)
    for split in _SPLITS:
      for metric in _METRICS:
        row[f'{split}_{metric}'] = results.get(split, {}).get(metric, '')
    rows.append(row)
  columns = list(rows[0]) if rows else ['name']
  with open(os.path.join(workdir_root, 'summary.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  cell = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v).replace('|', '\\|')
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row[c]) for c in columns) + ' |' for row in rows]
  with open(os.path.join(workdir_root, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot_accuracy(rows, os.path.join(workdir_root, 'accuracy_vs_k.png'))
  return rows


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Plots test (solid) and validation (dashed) accuracy against k, one line per
  query_chunk_size, over the rows that have results; vanilla points are horizontal lines."""
  import matplotlib
  matplotlib.use('Agg')  # files only: a sweep may run where there is no display
  from matplotlib import pyplot as plt

  finished = [row for row in rows if row['test_accuracy'] != '']
  figure, axes = plt.subplots(figsize=(6, 4))
  topk = sorted((row for row in finished if row.get('attention.kind') == 'topk'),
                key=lambda row: (row.get('attention.query_chunk_size', ''), row['attention.k']))
  for chunk, group in itertools.groupby(topk, key=lambda r: r.get('attention.query_chunk_size')):
    group = list(group)
    ks = [row['attention.k'] for row in group]
    line, = axes.plot(ks, [row['test_accuracy'] for row in group], 'o-',
                      label=f'top-k, query_chunk_size={chunk} (test)')
    axes.plot(ks, [row['validation_accuracy'] for row in group], 'o--', color=line.get_color(),
              alpha=0.6, label=f'top-k, query_chunk_size={chunk} (validation)')
  for row in finished:
    if row.get('attention.kind') != 'topk':
      axes.axhline(row['test_accuracy'], linestyle=':', color='gray')
      axes.annotate(f'{row["name"]} (test)', (0, row['test_accuracy']),
                    xycoords=('axes fraction', 'data'), fontsize=8)
  if topk:
    axes.set_xscale('log', base=2)
    ks = sorted({row['attention.k'] for row in topk})
    axes.set_xticks(ks, [str(k) for k in ks])
  axes.set_xlabel('k')
  axes.set_ylabel('accuracy')
  axes.set_title(f'{len(finished)} of {len(rows)} points finished')
  if topk:
    axes.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
