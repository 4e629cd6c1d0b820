"""The training loop of LRA classification and language modelling, for every attention kind.

`train_and_evaluate` trains a config's model (`lra.build.setup`) in a workdir (its files:
`lra.workdir`), evaluating on the validation split as it goes and on both held-out splits at the
end. The pieces it runs are elsewhere: the jitted steps (`lra.steps`), the train metrics and their
divergence check (`lra.progress`), the stop on a signal (`lra.preemption`), the checkpoints
(`lra.checkpointing`) and the metric files (`lra.metric_writer`).

Resuming: `train_and_evaluate` on a workdir with checkpoints continues from the latest usable one.
The checkpoint holds the train stream's position (its grain iterator state), which is restored in
constant time, and the dropout key is the seed's key folded with the step, so an interrupted and
resumed run reproduces the uninterrupted one; metric records past the resumed step are dropped, and
the elapsed wall time and the train metrics of the steps since the last train record carry over in
the checkpoint (so a record spanning the resume averages the same steps as without it).
"""
import contextlib
import datetime
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import grain
import jax
import ml_collections
from absl import logging
from flax.training import train_state

from lra.build import setup
from lra.checkpointing import UNUSABLE_DIR, CheckpointError, RunCheckpoints
from lra.evaluate import evaluate_splits
from lra.metric_writer import MetricWriter
from lra.preemption import StopRequest
from lra.progress import Diverged, Profiler, TrainMetrics
from lra.steps import Batch, Trainer, num_params
from lra.workdir import config_history, record_start, write_json
from lra.workdir_lock import WorkdirLock


def _limit(batches: Iterable[Batch], num_batches: int) -> Iterable[Batch]:
  return batches if num_batches == -1 else itertools.islice(batches, num_batches)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config`'s model on its task in `workdir`, resuming from the latest checkpoint there.

  Every `eval_frequency` steps (and at the last step) the model is evaluated on the validation
  split (`num_eval_steps` batches, -1 = all) and the best-accuracy state is checkpointed. At the
  end, the final state and the best state are each evaluated on the full validation and test
  splits in this process. Process 0 holds the workdir's lock throughout.

  Returns:
    The contents of results.json: {'step', 'validation': {'accuracy', 'loss'}, 'test': {...}
    (both of the final state), 'best_step', 'best': {'validation': ..., 'test': ...} (of the
    best-validation state), 'wall_time_s' (summed over the processes that trained this workdir,
    each up to the checkpoint the next one resumed from), 'num_params', 'config',
    'config_history' ([{'step', 'config'}] of every start in this workdir, by the step it started
    from)}.
    After SIGTERM/SIGINT: a checkpoint of the current step is saved, no results are computed
    and the signal is re-delivered once the handlers are restored, so the process ends as it
    would have without them.
  Raises:
    FloatingPointError: training diverged (NaN or infinity); the message names the step and the
      last checkpoint, which is finite, so a rerun with a corrected config resumes from it.
    WorkdirLockedError: another process is training in `workdir`.
    CheckpointError: checkpoints exist but none can be restored.
  """
  start_time = time.time()
  task, trainer = setup(config)
  os.makedirs(workdir, exist_ok=True)
  stop = StopRequest()
  try:
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
      return _train_and_evaluate(config, workdir, task, trainer, stop, start_time)
  finally:
    stop.resend()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Any,
                        trainer: Trainer, stop: StopRequest, start_time: float
                        ) -> dict[str, Any]:
  checkpoints = RunCheckpoints(workdir, keep=config.keep_checkpoints)
  writer = None
  batches = iter(task.train())
  try:
    state = trainer.init_state()
    count = num_params(state.params)
    logging.info('Model has %d parameters.', count)
    previous_time, window = 0.0, {}
    if checkpoints.latest_step() is not None:
      step, state = checkpoints.restore('latest', state, data_iterator=batches)
      previous_time, window = checkpoints.wall_time_s(step), checkpoints.train_window(step)
      logging.info('Resuming from step %d in %s.', step, workdir)
    first = int(state.step)
    record_start(config, workdir, first)
    best_step = checkpoints.best_step()
    if best_step is not None and best_step > first:
      # A state of steps this run trains again (e.g. of a diverged run): the best is chosen anew.
      logging.warning('Best checkpoint of step %d is past the resumed step %d; setting it aside.',
                      best_step, first)
      checkpoints.set_aside([best_step], 'best')
    # Records past the resumed step (and its final results) are written again.
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, keep=lambda record: (
        record['step'] < first or (record['step'] == first
                                   and not record['split'].startswith('final_'))),
        purge_step=first + 1)
    wall_time = lambda: previous_time + time.time() - start_time
    with stop:
      try:
        state = _train_loop(config, task, batches, trainer, state, TrainMetrics(window),
                            writer, checkpoints, stop, wall_time,
                            os.path.join(workdir, 'profile'))
      except Diverged as error:
        raise FloatingPointError(f'{error}; {_set_aside_diverged(checkpoints, error)}') from None
    if stop.signum is not None:
      logging.warning('Stopped by signal %d at step %d; checkpoint saved. Rerun to resume.',
                      stop.signum, int(state.step))
      return {'step': int(state.step), 'stopped_by_signal': stop.signum}
    results = _final_results(task, trainer, state, writer, checkpoints)
    results.update(wall_time_s=wall_time(), num_params=count, config=config.to_dict(),
                   config_history=config_history(workdir))
    write_json(os.path.join(workdir, 'results.json'), results)
    return results
  finally:
    if writer is not None:
      writer.close()
    batches.close()  # stops its decoding threads
    checkpoints.close()


def _set_aside_diverged(checkpoints: RunCheckpoints, error: Diverged) -> str:
  """Moves the periodic checkpoints of diverged states out of the resume's way (a state can be
  finite yet so large that its next loss is NaN) and says where a rerun starts."""
  diverged = [step for step in checkpoints.steps() if step >= error.state_step]
  checkpoints.set_aside(diverged)
  moved = (f'moved the diverged checkpoint(s) of step(s) {diverged} to {UNUSABLE_DIR}/; '
           if diverged else '')
  step = checkpoints.latest_step()
  if step is None:
    return (f'{moved}no checkpoint is left, so a rerun (e.g. with a lower learning_rate) starts '
            'from scratch')
  return (f'{moved}the last checkpoint, {checkpoints.path("latest", step)} (step {step}), is '
          'sound and a rerun (e.g. with a lower learning_rate) resumes from it')


def _train_loop(config: ml_collections.ConfigDict, task: Any, batches: grain.DatasetIterator,
                trainer: Trainer, state: train_state.TrainState, metrics: TrainMetrics,
                writer: MetricWriter, checkpoints: RunCheckpoints, stop: StopRequest,
                wall_time: Callable[[], float], profile_dir: str) -> train_state.TrainState:
  """Runs steps from `state.step` to `num_train_steps` (or until a stop signal), reading
  `batches` from where `state` left it and adding to `metrics` (holding the steps since the last
  train record)."""
  total = config.num_train_steps
  first = int(state.step)
  profiler = Profiler(profile_dir, first, config.profile_steps)
  clock, clock_step = time.time(), first
  try:
    for step in range(first + 1, total + 1):
      profiler.before(step)
      state, step_metrics = trainer.step(state, next(batches))
      profiler.after(step, state)
      metrics.add(step, step_metrics)
      metrics.fetch(keep_last=True)
      last = step == total
      # Asked once: a signal arriving during this step's hooks is handled at the next step.
      stopping = stop.at(step)
      do_log = step % config.log_every == 0 or last
      do_eval = step % config.eval_frequency == 0 or last
      do_save = step % config.checkpoint_every == 0 or last or stopping
      if not (do_log or do_eval or do_save):
        continue
      # Every step up to this one is checked finite before anything is evaluated or saved.
      metrics.fetch(keep_last=False)
      if do_log:
        summary = metrics.summary()
        rate = (step - clock_step) / max(time.time() - clock, 1e-9)
        summary['steps_per_second'] = rate
        writer.write(step, 'train', summary)
        eta = (total - step) / rate
        logging.info('step %d/%d: loss %.4f accuracy %.4f lr %.3g, %.2f steps/s, ETA %s', step,
                     total, summary['loss'], summary['accuracy'], summary['learning_rate'], rate,
                     datetime.timedelta(seconds=round(eta)))
      if do_eval:
        validation = trainer.evaluate(state.params, _limit(task.validation(),
                                                           config.num_eval_steps))
        writer.write(step, 'validation', validation)
        improved = checkpoints.save_best(step, state, validation)
        note = ' (best so far)' if improved else ''
        if not math.isfinite(validation['loss']):
          note = ' (non-finite loss: never selected as best)'
        logging.info('step %d validation: loss %.4f accuracy %.4f%s', step, validation['loss'],
                     validation['accuracy'], note)
      if do_save:
        checkpoints.save(step, state, wall_time_s=wall_time(), train_window=metrics.window(),
                         data_iterator=batches)
      if stopping:
        break
      clock, clock_step = time.time(), step  # steps/s counts training time only
  finally:
    profiler.close()
  return state


def _final_results(task: Any, trainer: Trainer, state: train_state.TrainState,
                   writer: MetricWriter, checkpoints: RunCheckpoints) -> dict[str, Any]:
  step = int(state.step)
  final = evaluate_splits(task, trainer, state.params)
  best_step = checkpoints.best_step()
  best = final
  if best_step is not None and best_step != step:
    try:
      _, best_state = checkpoints.restore('best', state)
      best = evaluate_splits(task, trainer, best_state.params)
    except CheckpointError as error:
      # The periodic checkpoints restore into this state's layout, so the best one is damaged,
      # not of another model: set aside, so that a rerun does not fail on it again.
      logging.warning('Best checkpoint %s is unusable; setting it aside and reporting no best '
                      'step (%s).', checkpoints.path('best', best_step), error)
      checkpoints.set_aside([best_step], 'best')
      best_step = None
  for split, values in final.items():
    writer.write(step, f'final_{split}', values)
  logging.info('final step %d: %s; best step %s: %s', step, final, best_step, best)
  return {'step': step, **final, 'best_step': best_step, 'best': best}
