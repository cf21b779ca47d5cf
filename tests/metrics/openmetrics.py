"""Parses OpenMetrics text from stdin with Prometheus's own Python parser
(prometheus_client.openmetrics.parser, which raises on anything the format
does not allow: a missing `# EOF`, a counter sample without `_total`, bad
label syntax, a histogram without its `+Inf` bucket, ...) and prints the
metric families as JSON for tests/metrics.rs to check values in."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = [
    {
        "name": f.name,
        "type": f.type,
        "help": f.documentation,
        "unit": f.unit,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples
        ],
    }
    for f in text_string_to_metric_families(sys.stdin.read())
]
json.dump(families, sys.stdout)
