"""A Kubernetes API emulator for Switchyard's tests: kmock (pinned in scripts/setup) serving the
real HTTP protocol (list, get, create, merge patch, delete, watch), with what kube-rs needs and
kmock 0.8 lacks:

- resourceVersion, uid and creationTimestamp stamped on what is written;
- errors with the reasons a real API server gives (`NotFound`, `AlreadyExists`);
- /api/v1/namespaces[/NAME] as a cluster-scoped resource, and deleting a namespace deletes
  everything in it (as the namespace controller does);
- labelSelector honoured by list, watch and delete-collection;
- pod logs (`GET .../pods/NAME/log`), set by tests with `POST /emulator/logs`;
- faults: `POST /emulator/faults {"method","path" (a regex),"status","count","retry_after"}`
  answers the next `count` matching requests with that status as a Kubernetes Status;
- broken watches: `POST /emulator/watch-gone {"count"}` ends every open watch stream, and the
  next `count` ones, with an ERROR 410 event, after which a client must list again.

Usage: python emulator.py [PORT]  (0, the default, picks a free port). Prints
`READY http://127.0.0.1:PORT` once it serves, then serves until killed.
"""
import asyncio, datetime, itertools, json, re, sys, uuid

import aiohttp.web
import kmock
from kmock._internal import enums, k8s as kk, parsing

_parse_path = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    # kmock reads /api/v1/namespaces[/NAME] as "namespace NAME, no resource".
    m = re.fullmatch(r'/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?', path)
    if m:
        return parsing.ParsedPath('', 'v1', 'namespaces', None, m.group(1), m.group(2))
    return _parse_path(path)


parsing.parse_path = parse_path


def matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(','))):
        if ' notin ' in term or ' in ' in term:
            key, values = re.split(r' (?:not)?in ', term, maxsplit=1)
            values = {v.strip() for v in values.strip('() ').split(',')}
            ok = (labels.get(key.strip()) in values) != (' notin ' in term)
        elif '!=' in term:
            k, v = term.split('!=', 1)
            ok = labels.get(k.strip()) != v.strip()
        elif '=' in term:
            k, v = term.split('=', 1)
            ok = labels.get(k.strip().rstrip('=')) == v.strip()
        elif term.startswith('!'):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def labels_of(obj: dict) -> dict:
    return (obj.get('metadata') or {}).get('labels') or {}


def status(code: int, message: str, retry_after: int | None = None) -> aiohttp.web.Response:
    reasons = {403: 'Forbidden', 404: 'NotFound', 409: 'AlreadyExists', 410: 'Expired',
               429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable'}
    body = {'apiVersion': 'v1', 'kind': 'Status', 'status': 'Failure', 'code': code,
            'reason': reasons.get(code, 'InternalError'), 'message': message}
    headers = {}
    if retry_after is not None:
        body['details'] = {'retryAfterSeconds': retry_after}
        headers['Retry-After'] = str(retry_after)
    return aiohttp.web.json_response(body, status=code, headers=headers)


class Emulator(kmock.KubernetesEmulator):
    versions = itertools.count(1)
    faults: list = []       # [method, path regex, status, remaining, retry_after]
    gone = 0                # watch streams still to break with a 410
    open_watches: set = set()
    logs: dict = {}         # (namespace, pod) -> text

    async def _handle(self, request):
        path = request.url.path
        for fault in self.faults:
            if fault[3] > 0 and request.method == fault[0] and re.search(fault[1], path):
                fault[3] -= 1
                return status(fault[2], 'injected by the test', fault[4])
        log = re.fullmatch(r'/api/v1/namespaces/([^/]+)/pods/([^/]+)/log', path)
        if log and request.method == 'GET':
            if not any(key[0].plural == 'pods' and key[1:] == (log[1], log[2]) and not obj.deleted
                       for key, obj in self._objects.items()):
                return status(404, f'pods "{log[2]}" not found')
            return aiohttp.web.Response(text=self.logs.get((log[1], log[2]), ''))
        if request.resource is not None and request.method == 'DELETE' and request.name is None:
            return await self._delete_collection(request)
        if request.action in (enums.action.CREATE, enums.action.UPDATE) \
                and isinstance(request.data, dict):
            meta = request.data.setdefault('metadata', {})
            meta['resourceVersion'] = str(next(self.versions))
            if request.action == enums.action.CREATE:
                meta.setdefault('uid', str(uuid.uuid4()))
                meta.setdefault('creationTimestamp', datetime.datetime.now(datetime.UTC)
                                .strftime('%Y-%m-%dT%H:%M:%SZ'))
                if request.namespace:
                    meta['namespace'] = request.namespace
        try:
            response = await super()._handle(request)
        except kk.KubernetesError as err:
            # The reasons real API servers give, which clients match on (`NotFound`...).
            return status(err.status, err.message or '')
        if request.resource is not None and request.resource.plural == 'namespaces' \
                and request.action == enums.action.DELETE and request.name:
            await self._delete_where(lambda key, obj: key[1] == request.name)
        return response

    async def _delete_where(self, condition) -> list:
        deleted = []
        async with self._lock:
            for key, obj in list(self._objects.items()):
                if not obj.deleted and condition(key, obj.raw):
                    raw = obj.raw
                    obj.delete()
                    deleted.append(raw)
                    await self._buses[key[0]].put({'type': 'DELETED', 'object': raw})
        return deleted

    async def _delete_collection(self, request):
        selector = request.params.get('labelSelector', '')
        deleted = await self._delete_where(
            lambda key, obj: key[0] == request.resource and key[1] == request.namespace
            and matches(labels_of(obj), selector))
        return aiohttp.web.json_response({'apiVersion': 'v1', 'kind': 'List', 'items': deleted,
                                          'metadata': {'resourceVersion': str(next(self.versions))}})

    async def _serve_list(self, request):
        out = await super()._serve_list(request)
        selector = request.params.get('labelSelector', '')
        out['items'] = [o for o in out['items'] if matches(labels_of(o), selector)]
        out['metadata']['resourceVersion'] = str(next(self.versions))
        return out

    async def _serve_watch(self, request):
        selector = request.params.get('labelSelector', '')
        yield b''
        if Emulator.gone > 0:
            Emulator.gone -= 1
            yield GONE
            return
        broken = asyncio.Event()
        Emulator.open_watches.add(broken)
        bus = self._buses[request.resource]
        # kmock 0.8 marks its bus only after streaming the existing objects, so a change made
        # in between is lost; a real API server never loses one. Mark and read in one step.
        async with self._lock:
            mark = await bus.mark()
            current = [{'type': 'ADDED', 'object': obj.raw} for key, obj in self._objects.items()
                       if not obj.deleted and self._in_scope(request, key)]
        events = bus.stream(since=mark).__aiter__()
        try:
            for event in current:
                if matches(labels_of(event['object']), selector):
                    yield event
            while True:
                next_event = asyncio.ensure_future(events.__anext__())
                breaking = asyncio.ensure_future(broken.wait())
                done, _ = await asyncio.wait({next_event, breaking},
                                             return_when=asyncio.FIRST_COMPLETED)
                if breaking in done:
                    next_event.cancel()
                    yield GONE
                    return
                breaking.cancel()
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    return
                obj = event.get('object', {}) if isinstance(event, dict) else {}
                meta = obj.get('metadata', {})
                key = (request.resource, meta.get('namespace'), meta.get('name'))
                if self._in_scope(request, key) and matches(labels_of(obj), selector):
                    yield event
        finally:
            Emulator.open_watches.discard(broken)
            await bus.unmark(mark)

    @staticmethod
    def _in_scope(request, key) -> bool:
        resource, namespace, name = key
        return (resource == request.resource
                and (request.namespace is None or namespace == request.namespace)
                and (request.name is None or name == request.name))


GONE = {'type': 'ERROR', 'object': {'apiVersion': 'v1', 'kind': 'Status', 'status': 'Failure',
        'code': 410, 'reason': 'Expired', 'message': 'too old resource version'}}


async def main(port: int) -> None:
    async with Emulator() as k8s, kmock.Server(k8s, port=port) as server:
        k8s.resources.load_bundled()

        def add_fault(request):
            d = request.data
            Emulator.faults.append([d['method'], d['path'], int(d['status']),
                                    int(d.get('count', 1)), d.get('retry_after')])
            return {'ok': True}

        def watch_gone(request):
            # Every open watch ends with a 410 now, and the next `count` ones at once.
            for broken in Emulator.open_watches:
                broken.set()
            Emulator.gone += int((request.data or {}).get('count', 0))
            return {'ok': True}

        def set_logs(request):
            d = request.data
            Emulator.logs[(d['namespace'], d['pod'])] = d['text']
            return {'ok': True}

        k8s['post /emulator/faults'] << add_fault
        k8s['post /emulator/watch-gone'] << watch_gone
        k8s['post /emulator/logs'] << set_logs
        print(f'READY http://127.0.0.1:{server.port}', flush=True)
        await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
