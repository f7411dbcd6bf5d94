"""The client agent's protocol as one sans-IO machine (``AgentMachine``) built from one
``PeerPaths`` per peer; natter_agent is the asyncio shell that carries out its actions."""
