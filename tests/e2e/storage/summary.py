#!/usr/bin/env python3
"""Summarises the Ginkgo JSON report of one e2e.test run (run.sh).

Counts every spec the focus selected once: passed, failed (failed, panicked,
timed out, aborted, interrupted) or skipped at run time, with the reason of
every skip grouped and counted; specs the focus/skip filter left out are not
counted (their number is said). A failure outside a spec (the suite's
set-up, a report hook) is a failure too. Exits 1 when anything failed.

Prints, last, the line scripts/test.sh adds up:
    storage-e2e: N passed, M failed, K skipped
"""
import collections
import json
import sys

FAILED = {"failed", "panicked", "timedout", "aborted", "interrupted"}


def spec_name(spec):
    return " ".join((spec.get("ContainerHierarchyTexts") or []) + [spec.get("LeafNodeText", "")])


def main(path):
    with open(path) as f:
        reports = json.load(f)
    passed, failed, skipped, filtered = 0, [], collections.Counter(), 0
    selected = 0
    for report in reports:
        selected += report.get("PreRunStats", {}).get("SpecsThatWillRun", 0)
        for spec in report.get("SpecReports") or []:
            state = spec.get("State", "")
            message = (spec.get("Failure") or {}).get("Message", "").strip()
            if spec.get("LeafNodeType") != "It":
                # Suite-level nodes (BeforeSuite, report hooks): only their
                # failures matter.
                if state in FAILED:
                    failed.append((spec.get("LeafNodeType", "suite node"), state, spec))
                continue
            if state == "passed":
                passed += 1
            elif state in FAILED:
                failed.append((spec_name(spec), state, spec))
            elif state == "skipped" and message:
                skipped[message.splitlines()[0]] += 1
            else:
                # Skipped by the focus/skip filter (no message), or pending.
                filtered += 1

    total_skipped = sum(skipped.values())
    print(f"storage-e2e: {selected} specs selected by the focus ({filtered} others left out)")
    for name, state, spec in failed:
        failure = spec.get("Failure") or {}
        loc = failure.get("Location") or {}
        print(f"storage-e2e FAILED ({state}): {name}")
        for line in failure.get("Message", "").strip().splitlines()[:8]:
            print(f"    {line}")
        if loc.get("FileName"):
            print(f"    at {loc['FileName']}:{loc.get('LineNumber', '?')}")
    if skipped:
        print(f"storage-e2e skipped ({total_skipped}), by reason:")
        for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:4d}  {reason}")
    print(f"storage-e2e: {passed} passed, {len(failed)} failed, {total_skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
