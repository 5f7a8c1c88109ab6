"""The PyTorch side of benchmarks/vs_pytorch.py: the MiniLM classifier in PyTorch + transformers, driven over
stdin/stdout so the two frameworks can take turns on the same CPU in one benchmark run.

Runs only in the separate PyTorch virtual environment (torch, transformers, numpy); never imported by jft.
One JSON command per input line, one JSON answer per output line:
  {"op": "setup", "model_dir": DIR, "num_classes": 8, "head_dropout": 0.1, "lr": 1e-4, "weight_decay": 0.01,
   "warmup_steps": 10, "total_steps": 1000, "clip_norm": 1.0, "device": "cpu" | "cuda",
   "matmul_precision": "highest" | "high",   ("high": float32 matmuls on TF32 tensor cores, JAX's GPU default)
   "autocast": null | "bfloat16"}            (torch.autocast: mixed precision, the weights staying float32)
  {"op": "train", "batch": {"input_ids": [[...]], "attention_mask": ..., "token_type_ids": ..., "label": [...]},
   "steps": N}                                     -> {"times": [seconds of each step], "loss": last loss}
  {"op": "eval", "batch": {...}, "steps": N}       -> {"times": [...]}   (eval mode, no gradients)
  {"op": "matmul", "size": 2048, "repeats": 10}    -> {"flop_per_s": best of the repeats}
  {"op": "profile", "batch": {...}, "steps": N}    -> {"ops": {aten op: self CPU ms per step}, "wall_ms": per step}
                                                      (torch.profiler over N training steps after one warm-up)
  {"op": "quit"}
The model matches jft's `BertClassifier(pooling='mean')`: the pretrained encoder without its pooler, the mean of
the last hidden states over real tokens, dropout, a new linear head; AdamW with weight decay on everything but
biases and LayerNorm parameters, gradient clipping by global norm, linear warmup and decay (the Hugging Face
recipe, `transformers.get_linear_schedule_with_warmup`), dropout on during training. With "autocast": "bfloat16"
the forward passes run under `torch.autocast` (PyTorch's mixed precision: matmuls in bf16, softmax, LayerNorm and
the loss in float32), as jft's `config.model.dtype='bfloat16'` does; bf16 needs no loss scaling.
"""

import contextlib
import json
import sys
import time

import torch
import transformers


def autocast_context(device: str, autocast: str | None):
  """torch.autocast on `device` ('cpu', 'cuda:0') to the dtype named `autocast` (e.g. 'bfloat16'), or nothing
  (float32) for None: PyTorch's mixed precision, the weights staying float32."""
  if autocast is None:
    return contextlib.nullcontext()
  return torch.autocast(device.split(':')[0], dtype=getattr(torch, autocast))


class MeanPoolClassifier(torch.nn.Module):

  def __init__(self, model_dir: str, num_classes: int, head_dropout: float):
    super().__init__()
    self.encoder = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False)
    self.dropout = torch.nn.Dropout(head_dropout)
    self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)

  def forward(self, input_ids, attention_mask, token_type_ids):
    hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return self.head(self.dropout(pooled))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
  no_decay = [p for n, p in model.named_parameters() if n.endswith('bias') or 'LayerNorm' in n]
  decay = [p for n, p in model.named_parameters() if not (n.endswith('bias') or 'LayerNorm' in n)]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}], lr=lr)
  schedule = transformers.get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
  return optimizer, schedule


def tensors(batch: dict, device: str) -> dict[str, torch.Tensor]:
  return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def synchronize(device: str) -> None:
  if device.startswith('cuda'):
    torch.cuda.synchronize(device)


class Worker:

  def setup(self, model_dir, num_classes, head_dropout, lr, weight_decay, warmup_steps, total_steps, clip_norm,
            device='cpu', matmul_precision='highest', autocast=None):
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(matmul_precision)
    self.device = device
    self.autocast = autocast
    self.model = MeanPoolClassifier(model_dir, num_classes, head_dropout).to(device)
    self.optimizer, self.schedule = make_optimizer(self.model, lr, weight_decay, warmup_steps, total_steps)
    self.clip_norm = clip_norm
    return {'torch': torch.__version__, 'transformers': transformers.__version__,
            'threads': torch.get_num_threads(), 'device': self.device_name(),
            'attention': getattr(self.model.encoder.config, '_attn_implementation', None)}

  def device_name(self) -> str:
    return torch.cuda.get_device_name(self.device) if self.device.startswith('cuda') else 'cpu'

  def train_step(self, inputs, labels) -> float:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with autocast_context(self.device, self.autocast):
      loss = torch.nn.functional.cross_entropy(self.model(**inputs), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.schedule.step()
    return loss.item()

  def train(self, batch, steps):
    batch = tensors(batch, self.device)
    labels = batch.pop('label')
    times, loss = [], None
    for _ in range(steps):
      start = time.perf_counter()
      loss = self.train_step(batch, labels)
      times.append(time.perf_counter() - start)
    return {'times': times, 'loss': loss}

  def eval(self, batch, steps):
    batch = tensors(batch, self.device)
    batch.pop('label', None)
    self.model.eval()
    times = []
    with torch.inference_mode(), autocast_context(self.device, self.autocast):
      for _ in range(steps):
        start = time.perf_counter()
        self.model(**batch).sum().item()
        times.append(time.perf_counter() - start)
    return {'times': times}

  def profile(self, batch, steps):
    batch = tensors(batch, self.device)
    labels = batch.pop('label')
    self.train_step(batch, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
      start = time.perf_counter()
      for _ in range(steps):
        self.train_step(batch, labels)
      wall = time.perf_counter() - start
    ops = {event.key: event.self_cpu_time_total / 1e3 / steps for event in profiler.key_averages()}
    return {'ops': ops, 'wall_ms': 1e3 * wall / steps}

  def matmul(self, size, repeats):
    a, b = torch.randn(size, size, device=self.device), torch.randn(size, size, device=self.device)
    a @ b
    synchronize(self.device)
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      a @ b
      synchronize(self.device)
      best = min(best, time.perf_counter() - start)
    return {'flop_per_s': 2 * size**3 / best}


def main():
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  worker = Worker()
  for line in sys.stdin:
    command = json.loads(line)
    op = command.pop('op')
    if op == 'quit':
      break
    print(json.dumps(getattr(worker, op)(**command)), flush=True)


if __name__ == '__main__':
  main()
