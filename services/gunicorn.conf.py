"""gunicorn settings for zswarm's HTTP API, for running gunicorn on its own:

    ZSWARM_NODE_ENDPOINT=ipc:///var/lib/zswarm/server/gateway.sock \\
        gunicorn -c services/gunicorn.conf.py 'zswarm.http.wsgi:app_factory()'

The settings live in the package (zswarm/http/gunicorn_conf.py), so the node's own gunicorn
and this one never drift apart; each may be overridden by the environment variable named there.
"""

from zswarm.http.gunicorn_conf import *  # noqa: F401,F403
