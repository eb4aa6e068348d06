"""The status page's HTML: one server-rendered document, no script, no external asset.

Jinja's autoescaping writes every value as text: instance names (the platform's
context) and causes are tenant-influenced. The answer's headers forbid scripts,
framing, and sending the URL (which holds the token) as a Referer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Response
from jinja2 import Environment

if TYPE_CHECKING:
    from broker.web.dashboard import Status

_ENV = Environment(autoescape=True)

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

NOT_FOUND = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>Not found"
             "</title></head><body><h1>Not found</h1><p>No status page at this address."
             "</p></body></html>")

_TEMPLATE = _ENV.from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="15">
<title>{{ s.name }} - PostgreSQL HA status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.state-ready { color: #186a1c; font-weight: bold; }
.state-degraded, .state-failed { color: #a31515; font-weight: bold; }
.muted { color: #666; }
.phase { white-space: nowrap; }
</style>
</head>
<body>
<h1 id="instance-name">{{ s.name }}</h1>
<p class="muted">instance {{ s.instance_id }} · plan {{ s.plan }} · page generated
{{ s.generated }}</p>
<table id="summary">
<tr><th>state</th><td class="state-{{ s.state }}">{{ s.state }}</td></tr>
{% if s.state_reason %}<tr><th>reason</th><td>{{ s.state_reason }}</td></tr>{% endif %}
<tr><th>replication</th><td>{{ s.replication }}</td></tr>
<tr><th>service address</th><td>{{ s.service_address }}:5432</td></tr>
<tr><th>last health check</th><td>{{ s.checked }}</td></tr>
<tr><th>CA certificate expires</th><td>{{ s.ca_expires }}</td></tr>
</table>
<h2>Nodes</h2>
<table id="nodes">
<tr><th>node</th><th>role</th><th>state</th><th>zone</th><th>server</th>
<th>replication lag</th><th>certificate expires</th></tr>
{% for n in s.nodes %}<tr class="node" data-role="{{ n.role }}">
<td>{{ n.id }}</td><td>{{ n.role }}</td><td>{{ n.state }}</td><td>{{ n.zone }}</td>
<td>{{ n.server }}</td><td>{{ n.lag }}</td><td>{{ n.certificate_expires }}</td></tr>
{% else %}<tr><td colspan="7">no nodes</td></tr>{% endfor %}
</table>
<h2>Failovers</h2>
<table id="failovers">
<tr><th>detected</th><th>kind</th><th>outcome</th><th>primary</th><th>cause</th>
<th>timings (each phase)</th><th>lag at promotion</th></tr>
{% for f in s.failovers %}<tr class="failover">
<td>{{ f.detected }}</td><td>{{ f.kind }}</td><td>{{ f.outcome }}</td><td>{{ f.nodes }}</td>
<td>{{ f.cause }}{% if f.detail %}<br><span class="muted">{{ f.detail }}</span>{% endif %}</td>
<td>{% for phase, took in f.phases %}<span class="phase" data-phase="{{ phase }}">{{ phase }}
{{ took }}</span>{% if not loop.last %}<br>{% endif %}{% else %}-{% endfor %}</td>
<td>{{ f.lag_at_promotion }}</td></tr>
{% else %}<tr><td colspan="7">none</td></tr>{% endfor %}
</table>
<p class="muted">Phases: fence (from detection to the old primary stopped), port (the
service address moved), promote (the standby takes writes), standby (a new standby
streams); total: detection to promotion.</p>
</body>
</html>
""")


def render(status: Status) -> str:
    return _TEMPLATE.render(s=status)


def respond(body: str, status: int) -> Response:
    response = Response(body, status=status, content_type="text/html; charset=utf-8")
    response.headers.update(HEADERS)
    return response
