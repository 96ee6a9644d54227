"""How long loading a rules file takes (parse, validate, overlap check, index), by shape.

Loading runs whenever the rules file changes; the overlap check compares upstream
templates, which used to take minutes for 1,000 placeholder-first rules (issue 10).
Prints one figure per shape (the best of a few repetitions, in milliseconds), then a
cached and an uncached lookup. A figure, not an assert: the machine is shared.

    .venv/bin/python bench/rulesload.py [--rules 1000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))

from regrewrite.rules import parse_rules  # noqa: E402


def literal_prefix(i: int) -> tuple[str, str]:
    return f"t{i}/{{x:path}}", f"acme_t{i}/{{x:path}}"


def placeholder_first(i: int) -> tuple[str, str]:
    return f"c{i}/{{x}}", f"{{x}}.u{i}"


def placeholder_then_path(i: int) -> tuple[str, str]:
    # The literal that tells rules apart ends the first component, a path follows.
    return f"p{i}/{{x}}/{{r:path}}", f"{{x}}.u{i}/{{r:path}}"


def literal_middle(i: int) -> tuple[str, str]:
    # No literal at either end of the upstream name: the prefix/suffix index cannot help.
    return f"m{i}/{{a}}/{{b}}", f"{{a}}/m{i}/{{b}}"


def mixed(i: int) -> tuple[str, str]:
    return (literal_prefix, placeholder_first, placeholder_then_path, literal_middle)[i % 4](i)


SHAPES = {
    "literal-prefix  t{i}/{x:path} -> acme_t{i}/{x:path}": literal_prefix,
    "placeholder-first  c{i}/{x} -> {x}.u{i}": placeholder_first,
    "placeholder-then-path  p{i}/{x}/{r:path} -> {x}.u{i}/{r:path}": placeholder_then_path,
    "literal-middle  m{i}/{a}/{b} -> {a}/m{i}/{b}": literal_middle,
    "mixed (the four in turn)": mixed,
}


def rules_text(shape, count: int) -> str:
    lines = ["rules:"]
    for i in range(count):
        client, upstream = shape(i)
        lines += [f"  - client: '{client}'", f"    upstream: '{upstream}'"]
    return "\n".join(lines) + "\n"


def resolve_all(rules, names: list[str]) -> None:
    for name in names:
        rules.resolve(name)


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {}
    for label, shape in SHAPES.items():
        text = rules_text(shape, args.rules)
        load = best_of(args.repeat, lambda text=text: parse_rules(text))
        rules = parse_rules(text)
        assert len(rules.names.rules) == args.rules
        names = [shape(i)[0] for i in range(200)]
        for placeholder, value in (("{x:path}", "a/b"), ("{r:path}", "c/d"), ("{x}", "app")):
            names = [n.replace(placeholder, value) for n in names]
        names = [n.replace("{a}", "x").replace("{b}", "y") for n in names]
        assert all(rules.route(n) is not None for n in names), "a rule does not route"
        fresh = [parse_rules(text) for _ in range(args.repeat)]
        uncached = min(best_of(1, functools.partial(resolve_all, r, names)) for r in fresh)
        cached = best_of(args.repeat, functools.partial(resolve_all, rules, names))
        uncached, cached = uncached / len(names), cached / len(names)
        results[label] = {
            "load_ms": load * 1e3,
            "resolve_uncached_us": uncached * 1e6,
            "resolve_cached_us": cached * 1e6,
        }
    if args.json:
        print(json.dumps({"rules": args.rules, "shapes": results}, indent=2))
        return
    print(f"{args.rules} rules, best of {args.repeat}")
    print(f"{'shape':66} {'load ms':>9} {'resolve us':>11} {'cached us':>10}")
    for label, r in results.items():
        print(
            f"{label:66} {r['load_ms']:9.0f} {r['resolve_uncached_us']:11.1f} "
            f"{r['resolve_cached_us']:10.2f}"
        )


if __name__ == "__main__":
    main()
