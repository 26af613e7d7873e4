"""A PyTorch M3oE of the same sizes as mdmt_tf's, to time both frameworks back to back.

Not part of the library (it lives under scripts/, which `pip install .` does not install)
and imports nothing of it: run it from the checkout with any Python that has torch
(`pip install torch==2.13.0`, CPU build), e.g.

    python scripts/bench/torch_reference.py --precision bfloat16 --threads 2

Written for this benchmark from the M3oE paper and mdmt_tf's own model (it is not the
authors' code): the same network as `mdmt_tf.models.M3oE` with its default sizes on the
synthetic schema (7 embedded fields x 16 + 1 dense = 113 inputs; STAR bottom; MLP 512 -> 256
with LayerNorm; 4 shared + 3 domain + 2 task experts 256 -> 256 -> 64 as one wide GEMM and
one batched GEMM; softmax shared gates on the detached bottom; balance and amplitude;
(domain, task) towers 64 -> 64 -> 1), Adam, batch 2048, random ids and labels. Modes:
`bilevel` (an architecture step on another batch, then a weight step, every step) and
`authors` (weight steps only, alpha / beta in the weight optimizer). Timing is at steady
state like `mdmt bench train`: median over trials of `steps` steps after a warm-up.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

VOCABS = (3646, 1919, 3, 13, 51, 21)  # the synthetic data's sparse fields
DOMAINS, TASKS, SHARED, DIM = 3, 2, 4, 16


def build(torch):
    nn = torch.nn

    class M3oE(nn.Module):
        def __init__(self):
            super().__init__()
            self.offsets = torch.tensor([0, *itertools.accumulate((DOMAINS,) + VOCABS)][:-1])
            self.embedding = nn.Embedding(DOMAINS + sum(VOCABS), DIM)
            n_in = (1 + len(VOCABS)) * DIM + 1
            self.star_w = nn.Parameter(torch.randn(n_in, n_in) * 0.05)
            self.star_wd = nn.Parameter(torch.ones(DOMAINS, n_in, n_in))
            self.star_b = nn.Parameter(torch.zeros(n_in))
            self.star_bd = nn.Parameter(torch.zeros(DOMAINS, n_in))
            self.bottom = nn.Sequential(nn.Linear(n_in, 512), nn.LayerNorm(512), nn.ReLU(),
                                        nn.Linear(512, 256), nn.LayerNorm(256), nn.ReLU())
            e = SHARED + DOMAINS + TASKS
            self.k1 = nn.Parameter(torch.randn(256, e * 256) * 0.05)
            self.b1 = nn.Parameter(torch.zeros(e * 256))
            self.k2 = nn.Parameter(torch.randn(e, 256, 64) * 0.05)
            self.b2 = nn.Parameter(torch.zeros(e, 1, 64))
            self.gates = nn.Linear(256, DOMAINS * TASKS * SHARED)
            self.beta_d = nn.Parameter(torch.ones(1))
            self.beta_t = nn.Parameter(torch.ones(1))
            self.alpha_d = nn.Parameter(torch.ones(1))
            self.alpha_t = nn.Parameter(torch.ones(1))
            self.t1 = nn.Parameter(torch.randn(DOMAINS, TASKS, 64, 64) * 0.05)
            self.tb1 = nn.Parameter(torch.zeros(DOMAINS, TASKS, 64))
            self.t2 = nn.Parameter(torch.randn(DOMAINS, TASKS, 64, 1) * 0.05)
            self.tb2 = nn.Parameter(torch.zeros(DOMAINS, TASKS, 1))

        def arch(self):
            return [self.beta_d, self.beta_t, self.alpha_d, self.alpha_t]

        def weights(self):
            arch = {id(p) for p in self.arch()}
            return [p for p in self.parameters() if id(p) not in arch]

        def forward(self, ids, dense, domain):
            onehot = nn.functional.one_hot(domain, DOMAINS).to(dense.dtype)  # [B, D]
            x = torch.cat([self.embedding(ids + self.offsets).flatten(1), dense], dim=1)
            kernels = self.star_w[None] * self.star_wd
            star = torch.einsum("bi,dio->bdo", x, kernels) + self.star_bd[None]
            star = torch.relu((star * onehot[:, :, None]).sum(1) + self.star_b)
            bottom = self.bottom(x + star)
            e = SHARED + DOMAINS + TASKS
            h = torch.relu(bottom @ self.k1 + self.b1).view(-1, e, 256).transpose(0, 1)  # [E, B, 256]
            experts = torch.relu(torch.bmm(h, self.k2) + self.b2).transpose(0, 1)        # [B, E, 64]
            shared, domains, tasks = experts.split([SHARED, DOMAINS, TASKS], dim=1)
            gates = torch.softmax(self.gates(bottom.detach()).view(-1, DOMAINS, TASKS, SHARED), -1)
            gates = (gates * onehot[:, :, None, None]).sum(1)                            # [B, T, S]
            shared_view = torch.einsum("bts,bsh->bth", gates, shared)
            domain_view = _balance(torch, domains, self.beta_d)
            domain_view = (domain_view * onehot[:, :, None]).sum(1)                      # [B, H]
            task_view = _balance(torch, tasks, self.beta_t)
            fused = (shared_view + torch.sigmoid(self.alpha_d) * domain_view[:, None]
                     + torch.sigmoid(self.alpha_t) * task_view)                          # [B, T, H]
            t = torch.relu(torch.einsum("bti,dtio->bdto", fused, self.t1) + self.tb1)
            logits = torch.einsum("bdti,dtio->bdto", t, self.t2)[..., 0] + self.tb2[..., 0]
            return (logits * onehot[:, :, None]).sum(1)                                  # [B, T]

    return M3oE()


def _balance(torch, experts, beta):
    own = torch.sigmoid(beta)
    others = experts.sum(1, keepdim=True) - experts
    return own * experts + (1 - own) / (experts.shape[1] - 1) * others


def batch(torch, size, generator):
    ids = torch.stack([torch.randint(0, DOMAINS, (size,), generator=generator)]
                      + [torch.randint(0, v, (size,), generator=generator) for v in VOCABS], dim=1)
    dense = torch.rand(size, 1, generator=generator)
    labels = (torch.rand(size, TASKS, generator=generator) < 0.3).float()
    return ids, dense, ids[:, 0], labels


def run(mode: str = "bilevel", precision: str = "float32", batch_size: int = 2048, steps: int = 20,
        trials: int = 5, threads: int = 2) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build(torch)
    weights = model.weights() + (model.arch() if mode == "authors" else [])
    weight_opt = torch.optim.Adam(weights, lr=1e-3)
    arch_opt = torch.optim.Adam(model.arch(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    train = [batch(torch, batch_size, generator) for _ in range(8)]
    held = [batch(torch, batch_size, generator) for _ in range(8)]
    bf16 = precision == "bfloat16"
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits

    def loss_of(data):
        ids, dense, domain, labels = data
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, dense, domain)
        return loss_fn(logits.float(), labels)

    def step(i):
        if mode == "bilevel":
            grads = torch.autograd.grad(loss_of(held[i % len(held)]), model.arch())
            for p, g in zip(model.arch(), grads):
                p.grad = g
            arch_opt.step()
        weight_opt.zero_grad(set_to_none=True)
        loss_of(train[i % len(train)]).backward()
        weight_opt.step()

    def timed(fn):
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            for i in range(steps):
                fn(i)
            times.append(time.perf_counter() - start)
        return sorted(times)

    for i in range(3):
        step(i)
    train_times = timed(step)
    model.eval()

    def infer(i):
        ids, dense, domain, _ = train[i % len(train)]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            torch.sigmoid(model(ids, dense, domain)).float()

    infer(0)
    infer_times = timed(infer)
    def rate(seconds):
        return steps * batch_size / seconds

    return {"framework": f"torch {torch.__version__}", "mode": mode, "precision": precision, "threads": threads,
            "batch_size": batch_size, "train_examples_per_second": rate(train_times[len(train_times) // 2]),
            "train_examples_per_second_best": rate(train_times[0]),
            "infer_examples_per_second": rate(infer_times[len(infer_times) // 2]),
            "infer_examples_per_second_best": rate(infer_times[0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="bilevel,authors")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for mode in args.modes.split(","):
        print(json.dumps(run(mode, args.precision, args.batch_size, args.steps, args.trials, args.threads)),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
