"""slime-router from Python, the way slime used SlimeRouter.

The wheel installs two executables, ``slime-router`` and ``mock-worker``; this package starts
the router from slime's argparse ``Namespace``::

    from slime_router import SlimeRouter, run_router

    run_router(args)                      # foreground, returns the exit code

    with SlimeRouter(args) as router:     # background, ready when the constructor returns
        router.add_worker("http://127.0.0.1:31001")
        print(router.url, router.list_workers())

Standard library only, so installing the wheel pulls in nothing else.
"""

from slime_router._router import (
    RouterError,
    SlimeRouter,
    binary_path,
    router_flags,
    run_router,
)

__all__ = ["RouterError", "SlimeRouter", "binary_path", "router_flags", "run_router"]
