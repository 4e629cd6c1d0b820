r"""ListOps generator: LRA's algorithm (lra.md §3), seeded and reproducible.

Writes `<output_dir>/listops-1000/basic_{train,val,test}.tsv` (header `Source\tTarget`), the
layout `lra.data.get_task('listops', output_dir)` reads. Example, a short set for a demo:

  python -m lra.data.listops_gen --output_dir=/tmp/listops --seed=0 --num_train=4000 \
      --num_valid=500 --num_test=500 --min_length=20 --max_length=100
"""
import os
import random
import statistics
from collections.abc import Sequence

from absl import app, flags

from lra.data import listops

OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')
END = ']'
OPERATOR_PROBABILITY = 0.25  # else a leaf digit (LRA: VALUE_P)

Tree = int | tuple


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int,
                  budget: float = float('inf')) -> tuple[Tree, int] | None:
  """Random expression as LRA builds it, and its token count (parentheses excluded).

  A node below `max_depth` is an operator with probability 0.25, else a digit; operators take
  2..`max_args` arguments. Operator nodes are left-nested pairs ((((op, a1), a2), ...), END).
  Returns None as soon as the tree is sure to reach `budget` tokens: such trees are rejected
  anyway, and the trees that are returned are exactly those of the unbounded process.
  """
  if depth < max_depth and rng.random() <= OPERATOR_PROBABILITY:
    num_args = rng.randint(2, max_args)
    length = 2  # the operator token and the closing bracket
    args = []
    for i in range(num_args):
      # The arguments still to come need at least one token each.
      generated = generate_tree(rng, depth + 1, max_depth, max_args,
                                budget - length - (num_args - 1 - i))
      if generated is None:
        return None
      args.append(generated[0])
      length += generated[1]
    tree = (rng.choice(OPERATORS), args[0])
    for arg in args[1:]:
      tree = (tree, arg)
    return (tree, END), length
  return (rng.randrange(10), 1) if budget > 1 else None


def to_string(tree: Tree) -> str:
  """LRA's text form: each pair as `( left right )`."""
  if isinstance(tree, tuple):
    return f'( {to_string(tree[0])} {to_string(tree[1])} )'
  return str(tree)


def evaluate(tree: Tree) -> int:
  """Value 0-9 of an expression tree (MED truncates the mean of the middle pair, as LRA)."""
  if not isinstance(tree, tuple):
    return tree
  node, args = tree[0], []  # tree[1] is END
  while isinstance(node[0], tuple):
    args.append(evaluate(node[1]))
    node = node[0]
  operator, args = node[0], [evaluate(node[1])] + args[::-1]
  if operator == '[MIN':
    return min(args)
  if operator == '[MAX':
    return max(args)
  if operator == '[MED':
    return int(statistics.median(args))
  return sum(args) % 10


def generate(seed: int, num_examples: int, *, max_depth: int = 10, max_args: int = 10,
             min_length: int = 500, max_length: int = 2000) -> list[tuple[str, int]]:
  """`num_examples` distinct (source, label) pairs with min_length < tokens < max_length.

  Raises:
    ValueError: a negative count, bad limits, or too few distinct expressions found within the
      attempt budget.
  """
  if num_examples < 0:
    raise ValueError(f'need num_examples >= 0, got {num_examples}')
  if max_depth < 1 or max_args < 2:
    raise ValueError(f'need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}')
  if min_length < 0 or max_length <= min_length + 1:
    raise ValueError(f'need 0 <= min_length < max_length - 1, got {min_length}, {max_length}')
  rng = random.Random(seed)
  examples = {}  # dict keeps first-seen order, unlike LRA's set, so output is reproducible
  attempts = 0
  max_attempts = 1000 * num_examples + 100_000
  while len(examples) < num_examples:
    attempts += 1
    if attempts > max_attempts:
      raise ValueError(f'found only {len(examples)} of {num_examples} distinct expressions with '
                       f'{min_length} < length < {max_length} in {max_attempts} attempts')
    generated = generate_tree(rng, 1, max_depth, max_args, budget=max_length)
    if generated is not None and generated[1] > min_length:
      examples.setdefault(to_string(generated[0]), generated[0])
  return [(source, evaluate(tree)) for source, tree in examples.items()]


def write_splits(output_dir: str, seed: int, num_train: int, num_valid: int, num_test: int,
                 **limits: int) -> list[str]:
  """Generates one pool of distinct expressions, splits it in order, writes the TSVs.

  The splits are consecutive slices of the pool, so no expression is in two splits.

  Returns:
    The written paths (train, validation, test).

  Raises:
    ValueError: a split size below 1 (the reader refuses empty splits) or bad `limits` (see
      `generate`), before anything is generated or written.
  """
  sizes = {'train': num_train, 'validation': num_valid, 'test': num_test}
  bad = {split: size for split, size in sizes.items() if size < 1}
  if bad:
    raise ValueError(f'every split needs at least one example, got {bad}')
  examples = generate(seed, sum(sizes.values()), **limits)
  directory = os.path.join(output_dir, listops.DIRNAME)
  os.makedirs(directory, exist_ok=True)
  paths, start = [], 0
  for split, size in sizes.items():
    path = os.path.join(directory, listops.FILES[split])
    with open(path, 'w', encoding='utf-8') as f:
      f.write('Source\tTarget\n')
      f.writelines(f'{source}\t{label}\n' for source, label in examples[start:start + size])
    paths.append(path)
    start += size
  return paths


_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Folder to write listops-1000/ into.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 96_000, 'Training examples.')
_NUM_VALID = flags.DEFINE_integer('num_valid', 2_000, 'Validation examples.')
_NUM_TEST = flags.DEFINE_integer('num_test', 2_000, 'Test examples.')
_MAX_DEPTH = flags.DEFINE_integer('max_depth', 10, 'Maximum nesting depth.')
_MAX_ARGS = flags.DEFINE_integer('max_args', 10, 'Maximum arguments per operator.')
_MIN_LENGTH = flags.DEFINE_integer('min_length', 500, 'Keep expressions with more tokens.')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 2000, 'Keep expressions with fewer tokens.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _OUTPUT_DIR.value:
    raise app.UsageError('--output_dir is required')
  try:
    paths = write_splits(_OUTPUT_DIR.value, _SEED.value, _NUM_TRAIN.value, _NUM_VALID.value,
                         _NUM_TEST.value, max_depth=_MAX_DEPTH.value, max_args=_MAX_ARGS.value,
                         min_length=_MIN_LENGTH.value, max_length=_MAX_LENGTH.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print('\n'.join(paths))


if __name__ == '__main__':
  app.run(main)
