"""The API's resources, one module each; importing a module declares its endpoints."""

from server.routes import me, snapshots, web_sessions

MODULES = (me, snapshots, web_sessions)
