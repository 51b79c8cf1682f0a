#!/usr/bin/python3
"""Self time per LibTorch op from the chrome trace `shardtune train --train.profile_step N` writes
(output.dir/profile_step_N_rankR.json), as a markdown table, largest first.

  bench/profile_table.py RUN_DIR/profile_step_4_rank0.json [--top 20]

Self time: an op's span minus the spans of the ops it called (nested events on one thread).
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    data = json.load(open(args.trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    by_thread = collections.defaultdict(list)
    for e in spans:
        by_thread[e.get("tid")].append(e)
    self_us = collections.Counter()
    calls = collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [end, name, child time]
        def close(entry):
            self_us[entry[1]] += entry[3] - entry[2]
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                close(stack.pop())
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e["name"], 0.0, dur])
            calls[e["name"]] += 1
        while stack:
            close(stack.pop())
    total = sum(self_us.values())
    print(f"| op | self ms | share | calls |\n|---|---|---|---|")
    for name, us in self_us.most_common(args.top):
        print(f"| {name} | {us / 1e3:.1f} | {us / total:.1%} | {calls[name]} |")
    print(f"| (all ops) | {total / 1e3:.1f} | 100% | {sum(calls.values())} |")


if __name__ == "__main__":
    main()
