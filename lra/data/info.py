"""`TaskInfo`: what a model needs to know about an LRA task, without reading any data."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """Static description of one LRA task.

  Attributes:
    name: registry name, e.g. 'listops' or 'pathfinder32'.
    vocab_size: number of token ids, padding id 0 included.
    num_classes: number of target classes.
    max_length: tokens per input sequence after padding/truncation.
    dual: True for two-input tasks (retrieval): batches carry `inputs1` and `inputs2`.
  """

  name: str
  vocab_size: int
  num_classes: int
  max_length: int
  dual: bool = False
