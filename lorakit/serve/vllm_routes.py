"""vLLM's runtime adapter endpoints, beside lorakit's own /v1/adapters, with vLLM's request shapes, answers
and statuses, so a gateway that manages adapters on vLLM replicas manages lorakit ones too.

    POST /v1/load_lora_adapter   {"lora_name", "lora_path", "load_inplace": false}
         200 text "Success: LoRA adapter '<name>' added successfully."
         400 missing name/path, invalid name, already loaded (without load_inplace), files that do not load
         403 a path outside every --allow-adapter-root (nothing is opened)
         404 no adapter at the path
    POST /v1/unload_lora_adapter {"lora_name"}
         200 text "Success: LoRA adapter '<name>' removed successfully."   400 no name   404 not loaded

Errors have vLLM's body, {"error": {"message", "type", "param": null, "code": <status>}}. "Loaded" means
resident in the store (whatever its source: a registered path, the adapter directory, the object store).
With load_inplace the new files replace the resident copy only once they have loaded
(AdapterStore.replace); until then, and on failure, the old copy serves.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import AdapterNotFoundError
from lorakit.io.files import CONFIG_NAME
from lorakit.names import adapter_name_problem
from lorakit.serve.adapter_paths import AdapterPathError, AdapterPathForbiddenError, AllowedRoots, PathAdapters
from lorakit.serve.adapter_store import AdapterLoadError, AdapterStore, InvalidAdapterNameError
from lorakit.serve.schema_types import integer

NO_NUL = r"^[^\x00]+$"


class LoadLoraAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    lora_path: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)
    load_inplace: bool = False


class UnloadLoraAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: integer() | None = None  # vLLM's alternative key; lorakit names adapters only (ignored)


class VllmError(Exception):
    """An answer in vLLM's error shape."""

    def __init__(self, status: int, message: str, type_: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": None,
                                     "code": self.status}}).encode()


class VllmAdapters:
    """The two endpoints' logic over one store (atomic per adapter name, as vLLM's per-name lock)."""

    def __init__(self, store: AdapterStore, paths: PathAdapters, roots: AllowedRoots, base_name: str) -> None:
        self.store, self.paths, self.roots, self.base_name = store, paths, roots, base_name
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def load(self, body: LoadLoraAdapterBody) -> str:
        from starlette.concurrency import run_in_threadpool

        name = body.lora_name
        problem = adapter_name_problem(name)
        if problem is not None or name == self.base_name:
            raise VllmError(400, problem or f"lora_name {name!r} is the base model's name", "InvalidUserInput")
        async with self._locks[name]:
            resident = name in self.store.resident()
            if resident and not body.load_inplace:
                raise VllmError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                     "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
            try:
                path = self.roots.check(body.lora_path)
            except AdapterPathError as exc:
                raise VllmError(400, str(exc), "InvalidUserInput") from exc
            except AdapterPathForbiddenError as exc:
                raise VllmError(403, str(exc), "PermissionDenied") from exc
            if not (path / CONFIG_NAME).is_file():
                raise VllmError(404, f"No adapter found at {body.lora_path} (no {CONFIG_NAME})", "NotFoundError")
            before = self.paths.register(name, path)
            try:
                await run_in_threadpool(self.store.replace if resident else self.store.load, name)
            except (AdapterNotFoundError, InvalidAdapterNameError) as exc:
                self.paths.register(name, before)
                raise VllmError(404, f"No adapter found at {body.lora_path}: {exc}", "NotFoundError") from exc
            except AdapterLoadError as exc:
                self.paths.register(name, before)
                raise VllmError(400, str(exc), "BadRequestError") from exc
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, body: UnloadLoraAdapterBody) -> str:
        name = body.lora_name
        if adapter_name_problem(name) is not None:  # could not have been loaded (and gets no lock)
            raise VllmError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        async with self._locks[name]:
            registered = self.paths.locate(name) is not None
            if name not in self.store.resident() and not registered:
                raise VllmError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            self.paths.register(name, None)
            try:
                self.store.unload(name)  # deferred while running requests use it
            except AdapterNotFoundError:
                pass  # registered, evicted since: forgetting the path was all there was to do
        return f"Success: LoRA adapter '{name}' removed successfully."
