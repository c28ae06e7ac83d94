"""The segments diagram in docs/deploy.md is drawn from deploy/flows.yaml as it is today."""

from __future__ import annotations

import re

from tests.deploy.diagram import DOT_PATH, SVG_PATH, render_dot
from tests.segmentation.model import load


def test_the_committed_diagram_source_is_what_flows_yaml_gives() -> None:
    assert DOT_PATH.read_text() == render_dot(load()), (
        "docs/img/segments.dot is stale: run `python -m tests.deploy.diagram`"
    )


def test_the_rendered_diagram_shows_every_segment_and_every_flow() -> None:
    svg = SVG_PATH.read_text()
    # dot escapes '-' as &#45; and '>' as &gt; in titles: an edge is "source->destination".
    titles = {
        title.replace("&#45;", "-").replace("&gt;", ">")
        for title in re.findall(r"<title>([^<]*)</title>", svg)
    }
    model = load()
    assert set(model.segments) <= titles
    for flow in model.flows:
        assert f"{flow.source}->{flow.destination}" in titles, flow
        assert f"{flow.port}/{flow.protocol}" in svg, flow
