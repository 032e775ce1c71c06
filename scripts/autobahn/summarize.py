"""Summarizes an Autobahn fuzzingclient report: one line per section, and a verdict.

Exits non-zero when any case FAILED, or when fewer cases ran than expected (a server that
dies mid-run makes wstest skip cases and still exit 0).
Usage: summarize.py REPORT_DIR AGENT EXPECTED_CASES
"""
import collections
import json
import os
import sys

report_dir, agent, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(report_dir, "index.json")) as f:
    results = json.load(f)[agent]

by_section = collections.defaultdict(collections.Counter)
problems = []
for case, result in results.items():
    section = int(case.split(".")[0])
    # The close behaviour can fail a case whose messages were right.
    verdict = result["behavior"]
    if result.get("behaviorClose") == "FAILED":
        verdict = "FAILED"
    by_section[section][verdict] += 1
    if verdict in ("FAILED", "NON-STRICT"):
        problems.append("%s %s (close: %s)" % (case, verdict, result.get("behaviorClose")))

kinds = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
print("section  " + "  ".join("%13s" % k for k in kinds))
total = collections.Counter()
for section in sorted(by_section):
    total.update(by_section[section])
    print("%7d  " % section + "  ".join("%13d" % by_section[section][k] for k in kinds))
print("  total  " + "  ".join("%13d" % total[k] for k in kinds))
for problem in sorted(problems):
    print("  " + problem)

ran = sum(total.values())
if ran < expected:
    print("autobahn: only %d of %d cases ran" % (ran, expected))
    sys.exit(1)
if total["FAILED"]:
    print("autobahn: %d FAILED" % total["FAILED"])
    sys.exit(1)
print("autobahn: %d cases, 0 FAILED" % ran)
