r"""Trains or evaluates an LRA model. The loop lives in `lra.train`, evaluation in
`lra.evaluate`.

Train (resumes automatically from the workdir's latest checkpoint):
  python train.py --config=configs/listops.py:topk,k=64 --workdir=runs/listops_topk
Evaluate a trained workdir with other attention settings (writes eval_results_<tag>.json):
  python train.py --mode=eval --config=configs/listops.py:vanilla --workdir=runs/listops_vanilla \
      --config.attention.kind=topk --config.attention.k=32
Any config field can be overridden with --config.<field>=<value>, and JAX's options are flags
too (e.g. --jax_log_compiles, --jax_platforms=cpu).
Several processes (multi-host GPU, or several processes on one host): start one per host with
`--multiprocess`; `jax.distributed.initialize` then auto-detects SLURM, Open MPI and Cloud TPU, or
reads JAX_COORDINATOR_ADDRESS together with --num_processes and --process_id. When a process dies,
the others stop with an error within --heartbeat_timeout_seconds (at once if they were in a
collective with it).
"""
import jax
from absl import app, flags, logging

import config_cli

_CONFIG = flags.DEFINE_string('config', None, 'Config file and its arg, e.g. '
                              'configs/listops.py:topk,k=64; override any field with '
                              '--config.<field>=<value>.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train_and_evaluate; eval: evaluate a trained workdir.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                                'Checkpoint that --mode=eval evaluates.')
_MULTIPROCESS = flags.DEFINE_bool('multiprocess', False,
                                  'Call jax.distributed.initialize() before anything else.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --multiprocess, if not '
                                      'auto-detected.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --multiprocess, if not auto-detected.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 100, 'With --multiprocess: seconds without a heartbeat after '
    'which JAX\'s coordination service declares a process dead and ends the others with an error '
    '(a process blocked on a dead peer outside a collective only learns of it this way).',
    lower_bound=1)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str], overrides: list[tuple[str, str]]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = config_cli.get_config(_CONFIG.value, overrides)
  from lra import evaluate, train  # imported here so that a config mistake is reported fast
  if _MULTIPROCESS.value:
    jax.distributed.initialize(num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  logging.info('JAX process %d/%d, local devices: %s, all devices: %d', jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  if _MODE.value == 'train':
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    evaluate.evaluate(config, _WORKDIR.value, checkpoint=_CHECKPOINT.value)


if __name__ == '__main__':
  jax.config.config_with_absl()  # JAX's options as absl flags, as big_vision's trainers do
  config_cli.run(main)
