"""Summarize a py-spy ``--format raw`` profile: where the samples are, by thread, self and inclusive.

    python bench/profile_summary.py bench/results/profile-...txt [--top 30] [--thread main|orm]
"""

import argparse
import collections
import re


def location(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):(\\d+)\)$", frame) or re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).split('site-packages/')[-1].split('/work/main/')[-1]})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", default="", help="only stacks whose first frame contains this")
    args = parser.parse_args()
    total = 0
    own, incl, threads = collections.Counter(), collections.Counter(), collections.Counter()
    for line in open(args.path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        if args.thread and args.thread not in frames[0]:
            continue
        n = int(count)
        total += n
        threads[frames[0][:70]] += n
        own[location(frames[-1])] += n
        for f in dict.fromkeys(location(f) for f in frames):
            incl[f] += n
    print(f"{total} samples")
    for name, n in threads.most_common(5):
        print(f"  thread {100 * n / total:5.1f}%  {name}")
    print("self:")
    for name, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("inclusive:")
    for name, n in incl.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
