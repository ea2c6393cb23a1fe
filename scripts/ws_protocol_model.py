"""`python3 scripts/ws_protocol_model.py`: every interleaving of csrc/attention.cu's warp-specialized forward
(attn_fwd_ws_kernel, with kPingpong) explored at the level of its synchronization, for 0 to MAX_BLOCKS key blocks.

What is modelled (a model of the protocol as written in the kernel, not of the compiled kernel: keep the two in
step when either changes):
- the producer thread's copies in its order: Q, K(0), then per block t: K(t + 1) once both consumer warp groups
  released K(t − 1) (its stage's last use), V(t) once both released V(t − 2); a copy lands at some later step;
- each consumer warp group as one actor (its warps move together): the waits on the full barriers, the reads of a
  stage (its products), the releases (the empty barriers), and the pingpong's turns at named barriers 2 and 3
  (group cw waits at 2 + cw with bar.sync, passes at 3 − cw with bar.arrive; group 0's first turn needs none,
  group 1 passes no last turn; a bar.sync's phase completes when the other group's arrival is in).

What is checked, in every reachable state: no deadlock (a state with no move is the end of the kernel); no stage
refilled while a group may still read it; no group arriving twice at a turn barrier within one phase; at the end,
no arrival pending and the products issued in turns g0, g1, g0, g1, ... Then each of MUTATIONS (a protocol bug) must
be caught, so that the model itself can fail. Exit status 0 when all holds.
"""

import sys
from collections import deque

MAX_BLOCKS = 6


def producer(blocks):
    ops = [("q", 0)] + ([("k", 0)] if blocks else [])
    for t in range(blocks):
        if t + 1 < blocks:
            ops.append(("k", t + 1))
        ops.append(("v", t))
    return ops


def consumer(blocks, cw, bugs=()):
    """The consumer warp group cw's operations, as attn_fwd_ws_kernel<..., kPingpong = true> orders them."""
    starter = 1 if "g1 starts" in bugs else 0

    def take(first):  # group 0's first turn needs no handover
        return [] if first and cw == starter else [("take", 2 + cw)]

    def give(last):  # group 1 passes no last turn
        return [] if last and cw == 1 and "g1 passes its last" not in bugs else [("give", 3 - cw)]

    ops = [("wait", "q", 0)]
    if not blocks:
        return ops
    ops += [("wait", "k", 0), *take(True), ("read", "k", 0), *give(blocks == 1), ("release", "k", 0)]
    for t in range(1, blocks):
        if t >= 2:
            ops.append(("release", "v", t - 2))
        early = "K released before its read" in bugs and t == 1
        ops += [("wait", "k", t), ("wait", "v", t - 1), *take(False), *([("release", "k", t)] if early else []),
                ("read", "k", t), ("read", "v", t - 1)]
        if not ("no pass" in bugs and t == 1):
            ops += give(t + 1 == blocks)
        if not early:
            ops.append(("release", "k", t))
    return ops + [("wait", "v", blocks - 1), ("read", "v", blocks - 1), ("release", "v", blocks - 1)]


def explore(blocks, bugs=()):
    """Every reachable state; raises AssertionError at the first broken property."""
    prod = producer(blocks)
    cons = [consumer(blocks, 0, bugs), consumer(blocks, 1, bugs)]
    # state: producer position, copies issued (not yet landed), landed, the consumers' positions, releases,
    # per turn barrier (2, 3) the waiting syncer and the arrived group, the order of the groups' first reads
    start = (0, frozenset(), frozenset(), (0, 0), frozenset(), ((None, None), (None, None)), ())
    seen, todo = {start}, deque([start])
    while todo:
        state = todo.popleft()
        pp, flying, landed, pcs, released, bars, order = state
        moves = []
        if pp < len(prod):
            kind, blk = prod[pp]
            if kind == "q" or blk < 2 or all((kind, blk - 2, g) in released for g in (0, 1)):
                moves.append((pp + 1, flying | {prod[pp]}, landed, pcs, released, bars, order))
        for copy in flying:
            moves.append((pp, flying - {copy}, landed | {copy}, pcs, released, bars, order))
        for g in (0, 1):
            if pcs[g] == len(cons[g]):
                continue
            op, nxt = cons[g][pcs[g]], tuple(pc + (i == g) for i, pc in enumerate(pcs))
            if op[0] == "wait":
                if (op[1], op[2]) in landed:
                    moves.append((pp, flying, landed, nxt, released, bars, order))
            elif op[0] == "read":
                assert (op[1], op[2] + 2) not in landed | flying, f"{op[1]}({op[2]})'s stage refilled while read"
                new_order = order + (g,) if op[1] == "k" else order
                moves.append((pp, flying, landed, nxt, released, bars, new_order))
            elif op[0] == "release":
                moves.append((pp, flying, landed, nxt, released | {(op[1], op[2], g)}, bars, order))
            elif op[0] == "take":
                i = op[1] - 2
                syncer, arrived = bars[i]
                if arrived is not None:  # the other group's arrival is in: the phase completes
                    b = list(bars)
                    b[i] = (None, None)
                    moves.append((pp, flying, landed, nxt, released, tuple(b), order))
                elif syncer is None:  # arrive and block
                    b = list(bars)
                    b[i] = (g, None)
                    moves.append((pp, flying, landed, pcs, released, tuple(b), order))
            elif op[0] == "give":
                i = op[1] - 2
                syncer, arrived = bars[i]
                assert arrived is None, f"group {g} arrives twice at barrier {op[1]} in one phase"
                b, new_pcs = list(bars), list(nxt)
                if syncer is not None:  # completes the phase: the blocked group goes on
                    b[i] = (None, None)
                    new_pcs[syncer] += 1
                else:
                    b[i] = (None, g)
                moves.append((pp, flying, landed, tuple(new_pcs), released, tuple(b), order))
        if not moves:
            assert pp == len(prod) and pcs == (len(cons[0]), len(cons[1])), f"deadlock with {blocks} blocks"
            assert bars == ((None, None), (None, None)), f"an arrival pending at exit: {bars}"
            assert order == (0, 1) * blocks, f"the turns' order {order}"
        for m in moves:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return len(seen)


MUTATIONS = ("g1 passes its last", "g1 starts", "no pass", "K released before its read")


def main() -> int:
    for blocks in range(MAX_BLOCKS + 1):
        print(f"{blocks} key blocks: {explore(blocks)} states, every property holds")
    for bug in MUTATIONS:
        try:
            for blocks in range(MAX_BLOCKS + 1):
                explore(blocks, (bug,))
        except AssertionError as e:
            print(f"mutation '{bug}' caught: {e}")
        else:
            print(f"mutation '{bug}' NOT caught: the model cannot see it")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
