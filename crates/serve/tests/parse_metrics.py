"""Parses a /metrics answer with the Prometheus client library's own text parser.

Called by tests/prometheus.rs: parse_metrics.py FILE. Prints each metric family's name, type and
sample count, one per line; exits non-zero if the text does not parse.
"""
import sys

from prometheus_client.parser import text_string_to_metric_families

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
for family in text_string_to_metric_families(text):
    print(family.name, family.type, len(family.samples))
