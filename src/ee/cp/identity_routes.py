"""Identity routes (admin): the VM-name bindings and their release.

A VM name is bound to the session key it first registered with (``ee.cp.identities``);
a new key for a bound name is refused ``KEY_CHANGED``, and a name whose signed binding
failed verification is held (``BINDING_INVALID``). Only an operator frees a name:

* ``GET /api/v2/admin/vm-names`` → ``{"vm_names": [{vm_name, agent_id, key_sha256,
  bound_at, state: bound|held, problem}]}``
* ``POST /api/v2/admin/vm-names/{vm_name}/release`` → 200 ``{"released": {…},
  "connected": bool}`` (the binding as it was; whether an agent of that name is still
  connected), 404 when the name is not bound; event ``identity.released``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response
from quart_trio import QuartTrio

from ee.actors.identity import agent_id_for
from ee.cp.errors import Who, guard, json_response, not_found
from ee.cp.tenants import Auth

if TYPE_CHECKING:
    from ee.cp.server import ControlPlane


def register(app: QuartTrio, cp: ControlPlane, auth: Auth) -> None:
    @app.get("/api/v2/admin/vm-names")
    @guard(Who.ADMIN)
    async def vm_names() -> Response:
        auth.admin_only()
        return json_response({"vm_names": await cp.identities.views()})

    @app.post("/api/v2/admin/vm-names/<vm_name>/release")
    @guard(Who.ADMIN)
    async def release_vm_name(vm_name: str) -> Response:
        auth.admin_only()
        released = await cp.release_name(vm_name)
        if released is None:
            raise not_found("bound VM name", vm_name)
        agent_id = agent_id_for(cp.bootstrap.cluster_id, vm_name)
        return json_response({"released": released.to_view(),
                              "connected": agent_id in cp.plane.sessions})
