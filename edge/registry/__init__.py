"""The registry server (`edge registry serve`): the fleet's reported and desired state.

Its server-side dependencies (aiohttp, asyncpg) come with the `registry` extra;
nothing here is imported by the agent.
"""
