"""Train fastlm's GPT on a small text, one byte a token, and sample from it.

    python examples/train_gpt.py                          # CPU, a 4-layer GPT-2-style model: a minute or two
    python examples/train_gpt.py --family llama           # the Llama family (RMSNorm, GQA, rope, SwiGLU)
    python examples/train_gpt.py --device cuda --n-layer 8 --n-embd 512 --n-head 8 --seq 512 --batch 32 \\
        --steps 3000 --lr 1e-3                            # a GPU: bf16 autocast, fastlm's kernels

The text is examples/data/nettle_manual.txt (the Nettle manual, public domain: see examples/data/README.md); its
last tenth is held out for the evaluation loss. Bytes are the tokens (vocabulary 256), so nothing needs a
tokenizer. Training: AdamW (no weight decay on norms and biases), linear warm-up then cosine decay to a tenth of
the rate, gradients clipped at norm 1; on CUDA under bf16 autocast. The loss is fastlm.linear_cross_entropy (the
logits are never made); --backend picks fastlm's backend ("auto": the kernels on CUDA, the reference on CPU).

Writes to --out: checkpoint.pt (the model's state dict, its config as a dict, the losses and the arguments; load
with `GPT(GPTConfig(**ckpt["config"])).load_state_dict(ckpt["model"])`) and loss.png (the training loss, its moving
average and the evaluation loss). Prints text sampled from the trained model at the end.
"""

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

import fastlm
from fastlm.models import GPT, GPTConfig

DATA = Path(__file__).resolve().parent / "data" / "nettle_manual.txt"
VOCAB = 256  # bytes
HELD_OUT = 0.1  # the last tenth of the text is the evaluation split
EVAL_SEED = 1234  # the evaluation batches are the same at every evaluation, so the curve compares like with like


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a UTF-8 (or any) text file; its bytes are the tokens")
    p.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=None, help="llama family: kv heads (default: n_head / 2)")
    p.add_argument("--seq", type=int, default=128, help="training sequence length (and the model's block_size)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20,
                   help="steps of linear learning-rate warm-up (at most a fifth of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=fastlm.BACKENDS, default="auto", help="fastlm's backend")
    p.add_argument("--out", type=Path, default=Path("runs/train_gpt"))
    p.add_argument("--prompt", default="The ")
    p.add_argument("--sample-tokens", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def model_config(args) -> GPTConfig:
    shape = dict(vocab_size=VOCAB, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    if args.family == "gpt2":
        return GPTConfig(**shape)
    return GPTConfig(**shape, n_kv_head=args.n_kv_head or max(1, args.n_head // 2), norm="rmsnorm", mlp="swiglu",
                     pos="rope", bias=False, tie_embeddings=False)


def load_splits(path: Path):
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    cut = int(len(data) * (1 - HELD_OUT))
    return data[:cut], data[cut:]


def get_batch(data, batch, seq, generator, device):
    """Random windows of seq + 1 bytes: the first seq are the input, the last seq (shifted by one) the targets."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def learning_rate(step, args):
    warmup = min(args.warmup, max(1, args.steps // 5))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer(model, args, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model, data, args, device, autocast):
    g = torch.Generator().manual_seed(EVAL_SEED)
    total = 0.0
    for _ in range(args.eval_batches):
        x, y = get_batch(data, args.batch, args.seq, g, device)
        with autocast():
            total += model(x, y).item()
    return total / args.eval_batches


@torch.no_grad()
def sample(model, prompt: bytes, n: int, args, device) -> str:
    """n bytes after the prompt. generate() keeps a KV cache of at most block_size positions: past that, generation
    restarts from the last half block of text."""
    g = torch.Generator(device).manual_seed(args.seed)
    out = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    block = model.config.block_size
    made = 0
    while made < n:
        context = out[:, -(block // 2):]
        step = min(n - made, block - context.shape[1])
        new = model.generate(context, step, temperature=args.temperature, top_k=args.top_k, generator=g)
        out = torch.cat((out, new[:, context.shape[1]:]), dim=1)
        made += step
    return bytes(out[0, len(prompt):].tolist()).decode("utf-8", errors="replace")


def plot(path: Path, train_losses, evals):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(train_losses) + 1)
    window = max(1, len(train_losses) // 20)
    smooth = [sum(train_losses[max(0, i - window + 1):i + 1]) / len(train_losses[max(0, i - window + 1):i + 1])
              for i in range(len(train_losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, train_losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="tab:blue", label=f"train (mean of {window})")
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:orange", label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    train, held_out = load_splits(args.data)
    torch.manual_seed(args.seed)
    config = model_config(args)
    model = GPT(config).to(device)
    opt = optimizer(model, args, device)
    # On CUDA: bf16 autocast (float32 weights and residual stream, bf16 matmuls and attention).
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    g = torch.Generator().manual_seed(args.seed)
    print(f"{args.family} model, {model.num_params() / 1e6:.2f}M parameters, on {device} (fastlm backend "
          f"{args.backend}); {len(train):,} training bytes, {len(held_out):,} held out", flush=True)

    from tqdm import tqdm

    train_losses, evals = [], []
    start = time.perf_counter()
    with fastlm.use_backend(args.backend):
        evals.append((0, evaluate(model, held_out, args, device, autocast)))
        bar = tqdm(range(1, args.steps + 1), disable=args.no_progress, file=sys.stderr, unit="step")
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step - 1, args)
            x, y = get_batch(train, args.batch, args.seq, g, device)
            with autocast():
                loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_losses.append(loss.item())
            if step % args.eval_every == 0 or step == args.steps:
                evals.append((step, evaluate(model, held_out, args, device, autocast)))
                bar.set_postfix(loss=f"{train_losses[-1]:.3f}", held_out=f"{evals[-1][1]:.3f}")
        elapsed = time.perf_counter() - start
        text = sample(model, args.prompt.encode(), args.sample_tokens, args, device)

    checkpoint = args.out / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config), "step": args.steps,
                "train_losses": train_losses, "eval": evals,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, checkpoint)
    plot(args.out / "loss.png", train_losses, evals)
    tokens = args.steps * args.batch * args.seq
    print(f"{args.steps} steps in {elapsed:.0f} s ({tokens / elapsed:,.0f} tokens/s); held-out loss "
          f"{evals[0][1]:.3f} → {evals[-1][1]:.3f}; wrote {checkpoint} and {args.out / 'loss.png'}")
    print(f"\n--- sample ({args.sample_tokens} bytes, temperature {args.temperature}, top-k {args.top_k}) ---\n"
          f"{args.prompt}{text}")
    return {"train_losses": train_losses, "eval": evals, "checkpoint": checkpoint, "plot": args.out / "loss.png",
            "sample": text}


if __name__ == "__main__":
    main()
