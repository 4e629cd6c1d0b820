"""`TaskInfo` and `task_info`: what a model needs to know about an LRA task, without reading data.

Everything here is static and imports neither TensorFlow nor the input pipelines, so models and
benchmarks (`benchmarks.model_step`) can size a task without them; `lra.data.registry.get_task`
builds the pipelines.
"""
import dataclasses
from typing import Any

# ListOps token id = index + 1; id 0 is padding. Never reorder: saved models depend on these ids.
LISTOPS_TOKENS = ('[MIN', '[MAX', '[MED', '[SM', ']', '0', '1', '2', '3', '4', '5', '6', '7', '8',
                  '9')
PATHFINDER_SIZES = (32, 64, 128, 256)
# LRA's difficulty splits: contour length 6 (baseline), 9 and 14 of the Pathfinder generator.
PATHFINDER_FOLDERS = {'easy': 'curv_baseline', 'intermediate': 'curv_contour_length_9',
                      'hard': 'curv_contour_length_14'}
_BYTE_VOCAB = 257  # text and retrieval: id = byte + 1, 0 = padding
_PIXEL_VOCAB = 256  # image and Pathfinder: grayscale values are the ids
# Language modelling of a text folder: ids as text's, plus the masked-LM mask id.
LM_MASK_ID = _BYTE_VOCAB
# What a task's targets are: one class per example, or the next byte (causal LM) or the masked
# bytes (masked LM) per position.
OBJECTIVES = ('classification', 'causal_lm', 'masked_lm')


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """Static description of one LRA task.

  Attributes:
    name: registry name, e.g. 'listops' or 'pathfinder32'.
    vocab_size: number of token ids, padding id 0 included.
    num_classes: number of target classes.
    max_length: tokens per input sequence after padding/truncation.
    dual: True for two-input tasks (retrieval): batches carry `inputs1` and `inputs2`.
    objective: a key of `OBJECTIVES`. For the language-model objectives `num_classes` is the
      vocabulary and batches carry `targets` and `target_weights` int32 `[B, max_length]`.
  """

  name: str
  vocab_size: int
  num_classes: int
  max_length: int
  dual: bool = False
  objective: str = 'classification'


@dataclasses.dataclass(frozen=True)
class _Spec:
  vocab_size: int
  num_classes: int
  max_length: int
  dual: bool = False
  options: tuple[str, ...] = ()


_PATHFINDER_OPTIONS = ('difficulty',)
_SPECS = {
    'listops': _Spec(len(LISTOPS_TOKENS) + 1, 10, 2000),
    'text': _Spec(_BYTE_VOCAB, 2, 1000),
    'retrieval': _Spec(_BYTE_VOCAB, 2, 4000, dual=True),
    'image': _Spec(_PIXEL_VOCAB, 10, 32 * 32),
    **{f'pathfinder{n}': _Spec(_PIXEL_VOCAB, 2, n * n, options=_PATHFINDER_OPTIONS)
       for n in PATHFINDER_SIZES},
    # Path-X is Pathfinder128 at the hard difficulty.
    'pathx': _Spec(_PIXEL_VOCAB, 2, 128 * 128),
    # A folder of UTF-8 text files (lra.data.text_folder), not an LRA task.
    'lm': _Spec(LM_MASK_ID + 1, LM_MASK_ID + 1, 256, options=('objective', 'pattern')),
}
TASK_NAMES = tuple(_SPECS)


def task_info(name: str, *, max_length: int | None = None, **task_options: Any) -> TaskInfo:
  """Static description of task `name` (no I/O).

  Args:
    name: one of `TASK_NAMES`.
    max_length: tokens per sequence (per document for retrieval); default LRA's length.
    **task_options: `difficulty` ('easy'|'intermediate'|'hard', default 'hard') for pathfinderN;
      for 'lm', `objective` ('causal_lm' or 'masked_lm', default 'causal_lm') and `pattern` (the
      glob of the files read, default '**/*.txt').

  Returns:
    The task's `TaskInfo`.
  """
  if name not in _SPECS:
    raise ValueError(f'Unknown task {name!r}; valid names: {", ".join(TASK_NAMES)}')
  spec = _SPECS[name]
  unknown = sorted(set(task_options) - set(spec.options))
  if unknown:
    raise ValueError(f'Unknown task_options {unknown} for task {name!r}; valid options: '
                     f'{list(spec.options) or "none"}')
  difficulty = task_options.get('difficulty', 'hard')
  if difficulty not in PATHFINDER_FOLDERS:
    raise ValueError(f'difficulty must be one of {list(PATHFINDER_FOLDERS)}, got {difficulty!r}')
  objective = task_options.get('objective', 'causal_lm' if name == 'lm' else 'classification')
  if name == 'lm' and objective not in OBJECTIVES[1:]:
    raise ValueError(f'objective must be one of {list(OBJECTIVES[1:])}, got {objective!r}')
  if max_length is not None and max_length <= 0:
    raise ValueError(f'max_length must be positive, got {max_length}')
  return TaskInfo(name=name, vocab_size=spec.vocab_size, num_classes=spec.num_classes,
                  max_length=max_length or spec.max_length, dual=spec.dual, objective=objective)
