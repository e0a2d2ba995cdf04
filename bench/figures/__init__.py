"""The seven figures of BRIEF §4; each module has ``async def run(ctx) -> Figure``."""
