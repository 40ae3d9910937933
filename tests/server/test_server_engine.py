"""The engine thread's shutdown path, with a stand-in engine (no model): `stop_serving` aborts
every request in flight, answers each with the given error, and refuses later submissions."""

import asyncio
import time

import pytest

from kiln.runtime.openai_protocol import shutting_down
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server_engine import EngineLoop


class NeverFinishingEngine:
    """Accepts requests that never finish on their own; records the aborted ones."""

    def __init__(self):
        self.running: set[str] = set()
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, arrival_time) -> None:
        self.running.add(request_id)

    def abort(self, request_id: str) -> None:
        self.running.discard(request_id)
        self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list:
        time.sleep(0.005)
        return []

    def stats(self) -> None:
        return None


def test_stop_serving_aborts_in_flight_and_refuses_new_requests():
    engine = NeverFinishingEngine()
    error = shutting_down("the server shut down before this request finished")

    async def scenario():
        engine_loop = EngineLoop(engine)
        engine_loop.start()
        try:
            submissions = [await engine_loop.submit("a", [[1], [2]], SamplingParams()),
                           await engine_loop.submit("b", [[3]], SamplingParams())]
            assert engine.running == {"a-0", "a-1", "b-0"}
            engine_loop.stop_serving(error)
            for submission in submissions:
                with pytest.raises(type(error)) as info:
                    async for _ in submission.outputs():
                        pass
                assert info.value is error
            with pytest.raises(type(error)) as info:
                await engine_loop.submit("c", [[4]], SamplingParams())
            assert info.value is error
        finally:
            engine_loop.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert sorted(engine.aborted) == ["a-0", "a-1", "b-0"] and not engine.running
