"""Expands a config's `get_sweep(arg)` into train.py runs, launches them, tabulates their results.

  python sweep.py --config=configs/listops.py:topk --config.data_dir=DATA   # print the commands
  python sweep.py --config=configs/listops.py:topk --config.data_dir=DATA \
      --launcher=local --parallel=2 --workdir_root=runs/listops_topk
  python sweep.py --config=configs/listops.py:topk --config.data_dir=DATA \
      --launcher=slurm --slurm_partition=gpu --slurm_time=600 --gpus_per_point=1 \
      --slurm_extra=account=proj,qos=normal --workdir_root=runs/listops_topk
  python sweep.py --status --workdir_root=runs/listops_topk

`--config.<field>=<value>` overrides (data folder, steps, batch size, ...) go to every point; one
of a swept field pins that axis. Every point's full config is checked before anything runs.
Each point trains in `<workdir_root>/<point>` (resuming from it, as train.py does), as a submitit
job: `local` runs --parallel points at once on this machine, `slurm` submits one job per point.
The local launcher waits for its points; `--status` reports a running sweep. Both write
`summary.csv`, `summary.md` and `accuracy_vs_k.png` in --workdir_root (see `sweeps`).
"""
import os
import pathlib
import shlex

from absl import app, flags

import config_cli
import sweeps

_TRAIN_PY = str(pathlib.Path(__file__).resolve().parent / 'train.py')
_LOCAL_FLAGS = ('parallel',)
_SLURM_FLAGS = ('slurm_partition', 'slurm_time', 'nodes_per_point', 'slurm_extra')


def default_workdir_root(config_spec: str) -> str:
  """runs/<config file stem>_<arg tokens>, e.g. runs/listops_topk_smoke."""
  path, _, arg = config_spec.partition(':')
  return os.path.join('runs', '_'.join(filter(None, [pathlib.Path(path).stem] + arg.split(','))))


def print_status(root: str) -> None:
  """Prints every point's state, then writes and prints the summary of the sweep in `root`."""
  status = sweeps.read_status(root)
  width = max(len(point.name) for point, _ in status)
  for point, state in status:
    print(f'{point.name:{width}}  {state}')
  launcher = sweeps.read_sweep(root)['launcher']
  sweeps.summarize([point for point, _ in status], root, launcher)
  with open(os.path.join(root, 'summary.md')) as f:
    print('\n' + f.read(), end='')


if __name__ == '__main__':
  # Flags live here so that importing this module (tests) never clashes with train.py's --config.
  _CONFIG = flags.DEFINE_string('config', None, 'Config file and arg, e.g. '
                                'configs/listops.py:topk; --config.<field>=<value> overrides go '
                                'to every point.')
  _LAUNCHER = flags.DEFINE_enum('launcher', None, sweeps.LAUNCHERS, 'Run the points: local (this '
                                'machine, --parallel at once) or slurm (one job per point). '
                                'Without it, print their train.py commands.')
  _STATUS = flags.DEFINE_bool('status', False, 'Report the state of each point of the sweep in '
                              '--workdir_root and write its summary.')
  _WORKDIR_ROOT = flags.DEFINE_string('workdir_root', None, 'Parent of the per-point workdirs; '
                                      'default runs/<config>_<arg>.')
  _GPUS = flags.DEFINE_integer('gpus_per_point', 1, 'GPUs of each point (local: a share of the '
                               'visible GPUs, none when there are none; slurm: per node).')
  flags.DEFINE_integer('parallel', 1, 'local: points trained at once.')
  flags.DEFINE_string('slurm_partition', None, 'slurm: partition of the jobs.')
  flags.DEFINE_integer('slurm_time', None, 'slurm: time limit of each job, in minutes.')
  flags.DEFINE_integer('nodes_per_point', 1, 'slurm: nodes of each point (one train.py '
                       '--multiprocess per node).')
  flags.DEFINE_list('slurm_extra', [], 'slurm: more sbatch options, key=value,... (e.g. '
                    'account=proj,qos=high).')
  FLAGS = flags.FLAGS

  def _check_flags() -> None:
    """Rejects a flag that the chosen mode would ignore, naming it."""
    launcher = _LAUNCHER.value
    for names, needs in ((_LOCAL_FLAGS, 'local'), (_SLURM_FLAGS, 'slurm')):
      for name in names:
        if FLAGS[name].present and launcher != needs:
          raise sweeps.SweepError(f'--{name} applies to --launcher={needs} only.')
    if FLAGS['gpus_per_point'].present and launcher is None:
      raise sweeps.SweepError('--gpus_per_point applies to --launcher=local or slurm only.')
    if launcher == 'slurm' and FLAGS.slurm_time is None:
      raise sweeps.SweepError('--launcher=slurm needs --slurm_time (minutes per job).')
    if _STATUS.value and (launcher or _CONFIG.value):
      raise sweeps.SweepError('--status reads the sweep in --workdir_root; it takes no --config '
                           'or --launcher.')
    if _STATUS.value and not _WORKDIR_ROOT.value:
      raise sweeps.SweepError('--status needs --workdir_root.')
    if not _STATUS.value and not _CONFIG.value:
      raise sweeps.SweepError('--config is required (or --status --workdir_root=DIR).')

  def main(argv: list[str], shared: list[tuple[str, str]]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    _check_flags()
    if _STATUS.value:
      if shared:
        raise sweeps.SweepError('--status takes no --config.<field> overrides.')
      print_status(_WORKDIR_ROOT.value)
      return
    import jax
    # The sweep process only checks configs: JAX on the CPU, leaving the GPUs to the points.
    jax.config.update('jax_platforms', 'cpu')
    spec = _CONFIG.value
    root = _WORKDIR_ROOT.value or default_workdir_root(spec)
    points = sweeps.expand(spec, shared)
    if _LAUNCHER.value is None:
      for point in points:
        train_args = sweeps.train_flags(spec, sweeps.point_overrides(shared, point.overrides),
                                        os.path.join(root, point.name))
        print(shlex.join(['python', 'train.py'] + train_args))
      return
    if _LAUNCHER.value == 'local':
      failed = sweeps.run_local(_TRAIN_PY, spec, shared, points, root, FLAGS.parallel,
                                _GPUS.value)
      sweeps.summarize(points, root)
      print(f'wrote {root}/summary.csv, summary.md and accuracy_vs_k.png')
      if failed:
        raise sweeps.SweepError(f'{len(failed)} of {len(points)} points failed: '
                                        f'{", ".join(failed)} (see summary.md)')
    else:
      options = sweeps.SlurmOptions(FLAGS.slurm_partition, FLAGS.slurm_time,
                                    FLAGS.nodes_per_point, sweeps.parse_slurm_extra(
                                        FLAGS.slurm_extra))
      sweeps.submit_slurm(_TRAIN_PY, spec, shared, points, root, options, _GPUS.value)
      print(f'follow it with: python sweep.py --status --workdir_root={root}')

  config_cli.run(main)
