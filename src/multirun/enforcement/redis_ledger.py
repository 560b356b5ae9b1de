"""RedisLedger: one run's ledger kept in Redis, shared by every process that runs its steps.

A :class:`~multirun.enforcement.ledger.RunLedger` counts what a run spends in
one process. When the steps of a run execute in several processes (workers of
a queue, a pool of agents), each process builds a RedisLedger for the same run
id and they all count into one Redis hash, with exact integer totals::

    from multirun.enforcement.redis_ledger import RedisLedgerFactory
    from multirun.models.budget import Budget

    ledgers = RedisLedgerFactory.from_uri("redis://127.0.0.1:6379/0?timeout=0.5")
    ledger = ledgers.ledger("run-42", Budget(max_steps=1000, max_cost_usd=5.0))
    ledger.begin_step()             # one EVALSHA: checks every limit, counts the step
    ledger.charge(1200, 3_600_000)  # no round trip: sent with the next begin_step (nano-dollars)
    sub = ledgers.ledger("run-42.a", Budget(max_tokens=10_000), ancestor_ids=["run-42"])

How it keeps the totals right:

* Each run is a hash at ``key_prefix + run_id``: the counters ``tokens``,
  ``cost_units`` (integer units of 1/COST_UNITS_PER_USD dollar), ``steps``,
  ``sub_agents`` and ``unpriced``; the limits; ``started_us`` and
  ``deadline_us`` on the Redis server's clock; and for each process (each
  redis client of a process) that counted into it, a field ``w:<id>``: how
  much of what that process counted the hash holds. The first process to
  create the hash sets its limits and start time; later ones adopt them, so
  every process enforces the same budget and measures duration on the same
  clock. A process that continues a run started elsewhere (``adopt``) joins
  the hash its owner created and does not create it when it joins.
* :meth:`RedisLedger.begin_step` is one EVALSHA of a Lua script. Redis runs a
  script atomically, so the check of every limit (the run's and each
  ancestor's) and the increment of ``steps`` on all of them cannot interleave
  with another process's: ``max_steps=1000`` lets exactly 1000 steps run
  however many processes race. The script returns the totals, so the local
  properties are refreshed without another round trip.
* :meth:`RedisLedger.charge` counts in this process at once and adds the usage
  to what the process counted into the run and each ancestor (a running total
  per hash); the next :meth:`~RedisLedger.begin_step` sends those totals in
  the same script, which adds, *before* it checks the limits, the part the
  hash does not hold yet (above its ``w:<id>`` field), so a step that spends
  costs one round trip, not two, and this process's own next step always sees
  it. :meth:`~RedisLedger.refresh` (run end, ``status``) and
  :meth:`~RedisLedger.count_sub_agent` send them too. Other processes see a
  charge once it is sent: at most one step later, which the bounded overshoot
  already allows for. Since a command sends totals, not increments, usage is
  added exactly once: a command that timed out and runs once the server
  answers again, and the next one that sends the same usage again, add it
  once between them. The step (or sub-agent) a command counts is not part of
  those totals: it is checked and counted by that command alone, so when the
  command times out the step does not run, yet it is counted if the command
  runs late (counted without running, never run without being counted).
* If the server loses a hash (a restart without persistence, FLUSHALL,
  eviction, expiry), the next command of each process that had counted into
  it finds no ``w:<id>`` field, and brings back the highest totals that
  process saw in a reply before the loss (which hold what it had counted
  into it) under what was counted into the new hash meanwhile: the field
  ``base`` is the part of the totals brought back, and each process raises
  it to what it saw, so the highest is brought back once, and what a process
  that had not counted into the lost hash counts is kept. Then it adds the
  rest of its own counts. A command that counts (a step, a sub-agent, usage
  sent) also re-creates the run's and its ancestors' hashes with the limits
  and start this process knows (its own runs', and those it read when it
  joined), so the limits, duration included, still hold. Spend that no
  process still counting into the run had seen is lost with the hash; usage
  sent by a command whose reply did not come back before the loss is counted
  twice if another process saw it in a reply.
* A new ledger's first command (the one that creates or joins the hash)
  reads what the hash holds of this process's counts, so a process whose
  ledgers of a run come and go goes on from there. A ledger with usage not
  sent yet is kept until it is: it goes with the process's next command for
  that run, or once Redis answers again (failing open), or at
  :meth:`RedisLedgerFactory.close` (which every ``MultiRunClient`` with a ``ledger_uri``
  calls at exit), even when the run is over. So is a ledger whose run's
  creation or new budget Redis does not have (made, or ``set_budget``, while
  failing open): a sub-run's usage sent into the run's hash does not carry
  them. The hash keeps one ``w:<id>`` field per process that counted into
  it, until it expires.
* Every write refreshes the keys' expiry (``ttl_seconds``, a week by default).

When Redis cannot be reached, or does not answer within the socket timeout,
the ledger fails closed: :class:`LedgerUnavailableError` is raised and the
step does not start (a run whose ledger could not be made is not made later,
a budget that could not be set is left as it was). With ``fail_open=True`` it
logs one warning and counts in this process alone: steps, sub-agents and
usage go into what the process counted into each run. One command tries
Redis again every :data:`RETRY_SECONDS` (the others do not wait for it); once
Redis answers, it and every ledger of the client send what they counted
meanwhile (a run made during the outage is created then with its limits,
even if it has ended, started when its ledger was made, so its duration
limit counts the outage), sharing resumes, and one more line is logged. A
step whose command timed out while failing open ran in this process, so it
is counted there too: if the command runs late, that step is counted twice.

A forked child is a process of its own: it sends what it counts, never what
its parent had not sent yet.

Needs the ``redis`` package (redis-py) and Redis 5 or newer. The keys of a
run and its ancestors are used by one script, so on Redis Cluster they must
hash to one slot (put a hash tag such as ``{tenant}`` in ``key_prefix``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from multirun.enforcement.ledger import Ledger, LedgerReadings, RunLedger
from multirun.errors import (
    ACCESS_HINT,
    ACCESS_REFUSED,
    BudgetExceededError,
    ConfigurationError,
    LedgerUnavailableError,
)
from multirun.models.budget import Budget, BudgetStatus
from multirun.pricing import COST_UNITS_PER_USD, cost_limit_units

if TYPE_CHECKING:
    import redis

_logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "multirun:ledger:"
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_TIMEOUT_SECONDS = 0.5
MAX_TIMEOUT_SECONDS = 1e9  # longer overflows the socket's timeout
MAX_TTL_SECONDS = 1e15  # longer overflows Redis's expiry time (milliseconds in 64 bits)
_US_PER_SECOND = 1_000_000


# -- Lua scripts -----------------------------------------------------------------
#
# Every script replies [status, now_us, n, then for each of its n keys: tokens,
# cost_units, steps, sub_agents, unpriced, started_us, deadline_us (-1 if
# unset)]; init, begin_step, add and read then give, for each key, what the hash
# holds of this process's counts (see add_counts); a refused begin_step
# appends [key index, limit, used, maximum].
# Limits come as 7 ARGV values from position p ("" = no limit): max_tokens,
# max_cost_units, max_cost_usd, max_steps, max_sub_agents, max_duration_us,
# max_duration_seconds. The *_usd and *_seconds values are the budget's own
# numbers, kept only to report them; the integer ones are what is checked.

_PRELUDE = """
local EXACT, EXACT_TEXT, EXACT_USD = 9007199254740991, '9007199254740991', '9007199.254740991'

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local LIMITS = {'max_tokens', 'max_cost_units', 'max_cost_usd', 'max_steps',
                'max_sub_agents', 'max_duration_us', 'max_duration_seconds'}
local COUNTS = {'tokens', 'cost_units', 'steps', 'sub_agents', 'unpriced'}

-- store the limits given from ARGV[p], replacing any earlier ones
local function set_limits(key, p, started)
  for i, name in ipairs(LIMITS) do
    local value = ARGV[p + i - 1]
    if value == '' then redis.call('HDEL', key, name) else redis.call('HSET', key, name, value) end
  end
  local duration = ARGV[p + 5]
  if duration == '' then
    redis.call('HDEL', key, 'deadline_us')
  else
    redis.call('HSET', key, 'deadline_us', started + tonumber(duration))
  end
end

-- a run's start from an argument: '' for now, else a time on this server's clock, or when below
-- zero, that many microseconds before now (a run made while Redis could not be reached)
local function start_of(arg, now)
  local started = tonumber(arg or '')
  if not started then return now end
  if started < 0 then return now + started end
  return started
end

-- the first creation of a run's hash sets its start time (ARGV[p + 7], see start_of: the start
-- of a run whose hash the server lost, or that was made during an outage) and limits; later ones
-- change nothing
local function create(key, p, now)
  local started = start_of(ARGV[p + 7], now)
  if redis.call('HSETNX', key, 'started_us', started) == 1 then set_limits(key, p, started) end
end

local function ints(text)
  local found = {}
  for n in string.gmatch(text, '%d+') do found[#found + 1] = tonumber(n) end
  return found
end

local function counts_text(c)
  return string.format('%d %d %d %d %d', c[1], c[2], c[3], c[4], c[5])
end

-- Raise key's totals to at least `floor` (lost: false), or so that the part of them that came back
-- rather than being counted into this hash is at least `floor` (lost: true, `floor` being the
-- totals a process saw before the server lost the hash: what was counted into it since it was
-- created again stays on top). That part is the field 'base'.
local function raise_totals(key, floor, lost)
  local base = ints(redis.call('HGET', key, 'base') or '0 0 0 0 0')
  local stored, raised = redis.call('HMGET', key, unpack(COUNTS)), false
  for i, name in ipairs(COUNTS) do
    local add = floor[i] - (lost and base[i] or tonumber(stored[i] or 0))
    if add > 0 then
      redis.call('HINCRBY', key, name, string.format('%d', add))
      base[i], raised = base[i] + add, true
    end
  end
  if raised then redis.call('HSET', key, 'base', counts_text(base)) end
end

-- Add to key what this process counted into it and the hash does not hold yet. ARGV[u]: all it
-- counted ("tokens cost_units steps sub_agents unpriced": its charges, and the steps and
-- sub-agents it counted while failing open), ARGV[u + 1]: what a reply said the hash held of it
-- ('' if no reply ever showed its field), ARGV[u + 2]: the highest totals it saw (while the hash
-- held its field). The field 'w:' .. ARGV[3] records what the hash holds: a command that runs
-- late after a time-out, or counts sent again, add nothing twice. No field: this process's first
-- count into the hash (its totals are at least those it saw: a restore while failing open), or,
-- when a reply showed the field, the hash was lost (expired, flushed, a restart without
-- persistence): the totals this process saw come back, under what others counted since.
-- Returns the field.
local function add_counts(key, u)
  local field = 'w:' .. ARGV[3]
  local held = redis.call('HGET', key, field)
  if not held then
    local lost = ARGV[u + 1] ~= ''
    raise_totals(key, ints(ARGV[u + 2]), lost)
    held = lost and ARGV[u + 1] or '0 0 0 0 0'
  elseif held == ARGV[u] then
    return held
  end
  local have, want = ints(held), ints(ARGV[u])
  for i, name in ipairs(COUNTS) do
    if want[i] > have[i] then
      redis.call('HINCRBY', key, name, string.format('%d', want[i] - have[i]))
      have[i] = want[i]
    end
  end
  held = counts_text(have)
  redis.call('HSET', key, field, held)
  return held
end

-- what each key's hash holds of the counts of the process ARGV[w] ('' for nothing)
local function held_of(w)
  local held = {}
  for k, key in ipairs(KEYS) do held[k] = redis.call('HGET', key, 'w:' .. ARGV[w]) or '' end
  return held
end

-- ARGV from 4, for each key: 1 and its limits and start (9 values) when this process knows them,
-- to re-create its hash if it expired or the server lost it (0 and 8 blanks when it does not: the
-- process that does re-creates it); then for each key its counts (3 values, see add_counts).
local function take_counts(now)
  local n, held = #KEYS, {}
  for k, key in ipairs(KEYS) do
    local p = 4 + 9 * (k - 1)
    if ARGV[p] == '1' then create(key, p + 1, now) end
  end
  for k, key in ipairs(KEYS) do held[k] = add_counts(key, 4 + 9 * n + 3 * (k - 1)) end
  return held
end

local function totals(status, now, held)
  local reply = {status, now, #KEYS}
  for _, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, 'tokens', 'cost_units', 'steps', 'sub_agents', 'unpriced',
                         'started_us', 'deadline_us')
    for j = 1, 5 do reply[#reply + 1] = tonumber(v[j] or 0) end
    reply[#reply + 1] = tonumber(v[6] or -1)
    reply[#reply + 1] = tonumber(v[7] or -1)
  end
  for _, h in ipairs(held or {}) do reply[#reply + 1] = h end
  return reply
end
"""

# KEYS: the run, then its ancestors. ARGV: ttl_ms, mode (1 = set_budget, 0 = create, 2 = adopt:
# create nothing, for a run continued from another process), this process's writer id, limits from
# 4, the run's start (11, see start_of), and for set_budget its id (12: once taken back, see
# _REVOKE, it sets nothing: a command that timed out and runs late). After the totals, for each
# key: what it holds of this process's counts ('' for nothing); then for each key: 1 if its hash
# exists (0 if not), and its stored max_tokens, max_cost_usd, max_steps, max_sub_agents and
# max_duration_seconds.
_INIT = """
local key, now = KEYS[1], now_us()
if ARGV[2] == '1' then
  if redis.call('HEXISTS', key, 'revoked:' .. ARGV[12]) == 0 then
    redis.call('HSETNX', key, 'started_us', start_of(ARGV[11], now))
    set_limits(key, 4, tonumber(redis.call('HGET', key, 'started_us')))
    redis.call('HSET', key, 'budget_by', ARGV[12])
  end
elseif ARGV[2] == '0' then
  create(key, 4, now)
end
redis.call('PEXPIRE', key, ARGV[1])
local reply = totals(1, now, held_of(3))
for _, k in ipairs(KEYS) do
  local stored = redis.call('HMGET', k, 'started_us', 'max_tokens', 'max_cost_usd', 'max_steps',
                            'max_sub_agents', 'max_duration_seconds')
  reply[#reply + 1] = stored[1] and 1 or 0
  for i = 2, 6 do reply[#reply + 1] = stored[i] or '' end
end
return reply
"""

# KEYS: the run, then its ancestors, nearest first. ARGV: check (1/0), ttl_ms, this process's
# writer id, then as take_counts reads them.
_BEGIN_STEP = """
local now = now_us()
local held = take_counts(now)
if ARGV[1] == '1' then
  for i, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, 'tokens', 'cost_units', 'steps', 'sub_agents', 'started_us',
                         'max_tokens', 'max_cost_units', 'max_cost_usd', 'max_steps', 'max_sub_agents',
                         'deadline_us', 'max_duration_seconds')
    local tokens, cost, steps, subs = tonumber(v[1] or 0), tonumber(v[2] or 0), tonumber(v[3] or 0),
                                      tonumber(v[4] or 0)
    local hit, used, maximum
    -- the same order and comparisons as first_exceeded(); the step about to start counts
    if v[6] and tokens >= tonumber(v[6]) then hit, used, maximum = 'max_tokens', tokens, v[6]
    elseif v[7] and cost >= tonumber(v[7]) then hit, used, maximum = 'max_cost_usd', cost, v[8]
    elseif v[9] and steps >= tonumber(v[9]) then hit, used, maximum = 'max_steps', steps, v[9]
    elseif v[11] and now >= tonumber(v[11]) then
      hit, used, maximum = 'max_duration_seconds', now - tonumber(v[5] or now), v[12]
    elseif v[10] and subs > tonumber(v[10]) then hit, used, maximum = 'max_sub_agents', subs, v[10]
    -- past EXACT, Lua's numbers (doubles) would round the totals: the ledger stops there
    elseif tokens >= EXACT then hit, used, maximum = 'max_tokens', tokens, EXACT_TEXT
    elseif cost >= EXACT then hit, used, maximum = 'max_cost_usd', cost, EXACT_USD
    end
    if hit then
      -- every key: the counts, or a lost hash re-created above, may have written any
      for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[2]) end
      local reply = totals(0, now, held)
      reply[#reply + 1] = i
      reply[#reply + 1] = hit
      reply[#reply + 1] = used
      reply[#reply + 1] = maximum or ''
      return reply
    end
  end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'steps', 1)
  redis.call('PEXPIRE', key, ARGV[2])
end
return totals(1, now, held)
"""

# KEYS: the run, then its ancestors. ARGV: sub-agents to count (1/0), ttl_ms, this process's
# writer id, then as take_counts reads them.
_ADD = """
local now = now_us()
local held = take_counts(now)
for _, key in ipairs(KEYS) do
  if ARGV[1] == '1' then redis.call('HINCRBY', key, 'sub_agents', 1) end
  redis.call('PEXPIRE', key, ARGV[2])
end
return totals(1, now, held)
"""

# KEYS[1]: the run. ARGV: ttl_ms, tokens, cost_units, steps, unpriced: each total becomes at least
# that (see raise_totals).
_RESTORE = """
local a = ARGV
raise_totals(KEYS[1], {tonumber(a[2]), tonumber(a[3]), tonumber(a[4]), 0, tonumber(a[5])}, false)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return totals(1, now_us())
"""

# KEYS[1]: the run. ARGV: ttl_ms, the id of a set_budget that failed (timed out), 1 and the limits
# before it from 4 (or 0: not known here). Takes it back: if it ran late, and no budget was set
# since, the limits before it come back; if it has not run yet, it will set nothing.
_REVOKE = """
local key = KEYS[1]
redis.call('HSET', key, 'revoked:' .. ARGV[2], 1)
if ARGV[3] == '1' and redis.call('HGET', key, 'budget_by') == ARGV[2] then
  set_limits(key, 4, tonumber(redis.call('HGET', key, 'started_us')))
  redis.call('HDEL', key, 'budget_by')
end
redis.call('PEXPIRE', key, ARGV[1])
return totals(1, now_us())
"""

# KEYS: the run, then its ancestors. ARGV: this process's writer id. Reads only; replies as init.
_READ = """
return totals(1, now_us(), held_of(1))
"""


@dataclass(frozen=True)
class _Script:
    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, body: str) -> _Script:
        source = _PRELUDE + body
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


_SCRIPTS = {
    name: _Script.of(name, body)
    for name, body in (
        ("init", _INIT),
        ("begin_step", _BEGIN_STEP),
        ("add", _ADD),
        ("restore", _RESTORE),
        ("revoke", _REVOKE),
        ("read", _READ),
    )
}
MAX_TOTAL = 2**53 - 1
"""The largest total of tokens or of cost units (nano-dollars: about $9 million) the shared ledger
counts exactly (its scripts count in Lua numbers, doubles). A process's counts stop there, and a
run that reaches it is refused its next step, as if it had that limit."""
_FIELDS_PER_KEY = 7
_COUNTS = 5  # a run's counters, in the scripts' order: tokens, cost_units, steps, sub_agents, unpriced
_TOKENS, _COST, _STEPS, _SUB_AGENTS, _UNPRICED = range(_COUNTS)
RETRY_SECONDS = 5.0
"""How long a fail-open ledger counts in process after Redis failed before it tries Redis again."""


class _Tally:
    """What this process counted into one run's hash, so that the scripts add it exactly once."""

    __slots__ = ("__weakref__", "counted", "held", "key", "known", "seen", "wrote")

    def __init__(self, key: str) -> None:
        self.key = key
        # All this process counted into the run: its charges, and the steps and sub-agents it
        # counted while failing open (a step that Redis counted is not in it).
        self.counted = [0] * _COUNTS
        self.held = [0] * _COUNTS  # how much of ``counted`` the hash held at the last reply
        # True once a reply showed the hash's field of this process's counts: if a later one does
        # not, the server lost the hash (see add_counts)
        self.wrote = False
        # the highest totals a reply gave while the hash held that field (or before it first did):
        # a lost hash gets them back
        self.seen = [0] * _COUNTS
        # False until an init reply said what the hash holds of this process's counts: an earlier
        # tally of the key (its ledgers gone) may have counted into it, and this one goes on from there
        self.known = False

    def take(self, held: list[int]) -> None:
        """Take in what a reply says the hash holds of this process's counts."""
        if self.known:
            _higher(self.held, held)
        else:
            self.counted = [mine + theirs for mine, theirs in zip(self.counted, held, strict=True)]
            self.held, self.known = held, True

    def args(self) -> tuple[str, str, str]:
        held = _counts_text(self.held) if self.wrote else ""
        return _counts_text(self.counted), held, _counts_text(self.seen)


def _counts_text(counts: list[int]) -> str:
    return " ".join(map(str, counts))


def _higher(mine: list[int], theirs: Iterable[int]) -> None:
    for i, value in enumerate(theirs):
        if value > mine[i]:
            mine[i] = value


def _new_writer() -> str:
    return os.urandom(8).hex()


@dataclass
class _ClientState:
    """What the ledgers of one redis client share in this process."""

    url: str
    errors: tuple[type[BaseException], ...]
    no_script: type[BaseException]
    refused: tuple[type[BaseException], ...]  # wrong credentials or ACL: no outage
    lock: threading.Lock = field(default_factory=threading.Lock)
    sending: threading.Lock = field(default_factory=threading.Lock)  # one send_pending at a time
    loaded: bool = False
    local: bool = False  # fail-open mode after Redis failed: count in this process only
    retry_at: float = 0.0  # when a fail-open ledger tries Redis again (its clock)
    # names this process's counts in each run's hash: see add_counts in the scripts
    writer: str = field(default_factory=_new_writer)
    tallies: weakref.WeakValueDictionary[str, _Tally] = field(default_factory=weakref.WeakValueDictionary)
    # for each key whose counts Redis does not hold all of yet, the last ledger that counted into
    # it, kept when its run is over: the next command for the key sends them, and so do Redis
    # answering again (a fail-open client) and close
    unsettled: dict[str, RedisLedger] = field(default_factory=dict)
    # the ledgers whose run's creation or new budget Redis does not have yet (made, or their
    # budget set, while failing open), kept until it has them: a sub-run's usage sent into the
    # run's hash does not carry them
    unmade: set[RedisLedger] = field(default_factory=set)
    live: weakref.WeakValueDictionary[str, RedisLedger] = field(default_factory=weakref.WeakValueDictionary)
    made: weakref.WeakSet[RedisLedger] = field(default_factory=weakref.WeakSet)  # every ledger, for fork

    def tally(self, key: str) -> _Tally:
        """The tally of ``key``, which every ledger of this client that counts into it shares."""
        with self.lock:
            tally = self.tallies.get(key)
            if tally is None:
                tally = self.tallies[key] = _Tally(key)
            return tally

    def ledgers(self) -> list[RedisLedger]:
        """The ledgers that may have counts to send: those in use, and those kept for them."""
        with self.lock:
            kept = (*self.live.values(), *self.unsettled.values(), *self.unmade)
            found = {id(ledger): ledger for ledger in kept}
        return list(found.values())

    def may_try(self, now: float) -> bool:
        """Whether a fail-open ledger should send a command (False: count in process). After a
        failure, one command tries Redis again every RETRY_SECONDS; the others do not wait for it."""
        if not self.local:
            return True
        with self.lock:
            if self.local and now < self.retry_at:
                return False
            self.retry_at = now + RETRY_SECONDS
            return True

    def after_fork(self) -> None:
        """In a forked child: a writer of its own, which has counted nothing yet. What the parent
        counted and had not sent is the parent's to send. New locks: a thread the child lost may
        have held one (the child's next charge would wait for it for ever)."""
        self.lock, self.sending = threading.Lock(), threading.Lock()
        for ledger in list(self.made):
            ledger._lock = threading.Lock()
            for enclosing in ledger._enclosing:
                enclosing._lock = threading.Lock()
        self.writer = _new_writer()
        self.unsettled.clear()
        self.unmade.clear()
        for tally in list(self.tallies.values()):
            tally.counted, tally.held, tally.known, tally.wrote = [0] * _COUNTS, [0] * _COUNTS, True, False


_client_states: weakref.WeakKeyDictionary[Any, _ClientState] = weakref.WeakKeyDictionary()
_client_states_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _client_states_lock
    _client_states_lock = threading.Lock()
    for state in list(_client_states.values()):
        state.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _state_of(client: redis.Redis) -> _ClientState:
    with _client_states_lock:
        state = _client_states.get(client)
        if state is None:
            import redis.exceptions

            state = _ClientState(
                url=_client_url(client),
                errors=(redis.exceptions.RedisError, OSError),
                no_script=redis.exceptions.NoScriptError,
                refused=(
                    redis.exceptions.AuthenticationError,
                    redis.exceptions.AuthorizationError,
                    redis.exceptions.NoPermissionError,
                ),
            )
            _client_states[client] = state
        return state


def _client_url(client: redis.Redis) -> str:
    """The client's server as a URL for messages, without its password."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__.startswith("SSL") else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit_args(budget: Budget | None) -> list[str]:
    """The budget as the 7 limit values the scripts take ("" = no limit)."""
    if budget is None:
        return [""] * 7
    cost, duration = budget.max_cost_usd, budget.max_duration_seconds
    return [
        "" if budget.max_tokens is None else str(budget.max_tokens),
        "" if cost is None else str(cost_limit_units(cost)),  # as RunLedger compares
        "" if cost is None else repr(float(cost)),
        "" if budget.max_steps is None else str(budget.max_steps),
        "" if budget.max_sub_agents is None else str(budget.max_sub_agents),
        "" if duration is None else str(_duration_us(duration)),
        "" if duration is None else repr(float(duration)),
    ]


def _duration_us(seconds: float) -> int:
    """A duration limit in whole microseconds, rounded up as the scripts compare it. A limit so
    large that its microseconds overflow a float (over ~1.8e302 seconds) is a whole number of
    seconds already, converted exactly."""
    micros = seconds * _US_PER_SECOND
    if math.isinf(micros):
        return int(seconds) * _US_PER_SECOND
    return math.ceil(micros)


_UNKNOWN_LIMITS = ("0", *[""] * 8)  # and no start


def _stored_limits(reply: list[Any], keys: int) -> list[list[str] | None]:
    """From the init script's reply: each key's limits as script arguments, None if it has no hash."""
    tail = reply[len(reply) - 6 * keys :]
    found: list[list[str] | None] = []
    for k in range(keys):
        exists, *stored = tail[6 * k : 6 * k + 6]
        found.append(_limit_args(_budget_from(stored)) if int(exists) else None)
    return found


def _budget_from_args(limits: list[str] | None) -> Budget | None:
    """The Budget of 7 limit arguments (``_limit_args``'s inverse); None for none or unknown."""
    if limits is None:
        return None
    tokens, _units, cost, steps, sub_agents, _duration_us, duration = limits
    return _budget_from([tokens, cost, steps, sub_agents, duration])


def _budget_from(stored: Sequence[Any]) -> Budget | None:
    """The Budget stored in a run's hash (max_tokens, max_cost_usd, max_steps, max_sub_agents, duration)."""
    tokens, cost, steps, sub_agents, duration = (_text(v) for v in stored)
    if not any((tokens, cost, steps, sub_agents, duration)):
        return None
    return Budget(
        max_tokens=int(tokens) if tokens else None,
        max_cost_usd=float(cost) if cost else None,
        max_steps=int(steps) if steps else None,
        max_sub_agents=int(sub_agents) if sub_agents else None,
        max_duration_seconds=float(duration) if duration else None,
    )


class RedisLedger(LedgerReadings):
    """One run's ledger in Redis; a drop-in for RunLedger when steps run in several processes.

    ``ancestor_ids`` are the enclosing runs' ids, nearest first: every step
    and charge also counts in their hashes, and their limits stop this run.
    ``budget`` is stored when this call creates the run's hash; if another
    process created it first, its budget is adopted (see :attr:`budget`).

    The counters (:attr:`tokens`, :attr:`steps`, ...) are the run's totals in
    Redis as of this process's last round trip; :meth:`status` fetches fresh
    ones. With ``fail_open=True``, a Redis failure logs one warning and every
    fail-open ledger on the same client counts in this process only, checking
    its own budget and its ancestors' (for an ancestor whose ledger is in
    another process, the limits read when this ledger was made), until Redis
    answers one of the tries made every :data:`RETRY_SECONDS`.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        run_id: str,
        budget: Budget | None = None,
        ancestor_ids: Iterable[str] = (),
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        fail_open: bool = False,
        clock: Callable[[], float] = time.monotonic,
        adopt: bool = False,
    ) -> None:
        ancestors = tuple(ancestor_ids)
        ids = (run_id, *ancestors)
        if not all(isinstance(i, str) and i for i in ids):
            raise ConfigurationError(
                f"RedisLedger: run and ancestor ids must be non-empty strings, got {ids!r}"
            )
        if len(set(ids)) != len(ids):
            raise ConfigurationError(f"RedisLedger: a run id appears twice in run and ancestor ids {ids!r}")
        if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
            raise ConfigurationError(
                f"RedisLedger: ttl_seconds must be > 0 and at most {MAX_TTL_SECONDS:g}, got {ttl_seconds!r}"
            )
        self.run_id = run_id
        self.ancestor_ids = ancestors
        self.key = key_prefix + run_id
        self._keys = [self.key, *(key_prefix + a for a in ancestors)]
        self._client: Any = redis_client  # Any: redis-py 5 leaves some methods untyped
        self._shared = _state_of(redis_client)
        self._ttl_ms = str(max(1, int(ttl_seconds * 1000)))
        self._fail_open = fail_open
        self._clock = clock
        self._lock = threading.Lock()
        self.tokens = 0
        self.cost_units = 0
        self.steps = 0
        self.sub_agents = 0
        self.unpriced_reports = 0
        self.budget = budget
        # The limits of this run and of each ancestor, to re-create a hash the server lost: this
        # run's own, or those stored when this ledger was made (None: not known here).
        self._limits: list[str] | None = _limit_args(budget)
        self._ancestor_limits: list[list[str] | None] = [None] * len(ancestors)
        # The server clock at the last reply, and this process's clock when it came:
        # elapsed() measures from the run's start on the server without a round trip.
        self._started_us = 0
        self._server_now_us = 0
        self._at = clock()
        # the ancestors, as this ledger sees them when theirs does not live in this process
        self._enclosing = [_Enclosing(ancestor, self) for ancestor in ancestors]
        self._tallies = [self._shared.tally(key) for key in self._keys]
        # the init script's mode until it has run: made while failing open, it runs once Redis answers
        self._unjoined: str | None = "2" if adopt else "0"
        self._budget_unsent = False  # set_budget while failing open: sent once Redis answers
        # the set_budget commands that timed out failing closed, with the limits before each:
        # taken back before this ledger's next command, in case Redis runs them late
        self._revokes: list[tuple[str, list[str] | None]] = []
        # last: from here another thread may flush it (Redis answering again, close)
        self._shared.live[self.key] = self
        self._shared.made.add(self)
        try:
            self._join()
        except LedgerUnavailableError:  # failing closed: the run was not made, nothing of it to send
            self._forget()
            raise

    def _forget(self) -> None:
        """Remove this ledger from its client's: a ledger that could not be made."""
        shared = self._shared
        with shared.lock:
            if shared.live.get(self.key) is self:
                del shared.live[self.key]
            shared.made.discard(self)

    def _join(self) -> bool:
        """Create the run's hash (or join it) and read the limits stored for it and its ancestors,
        and what the hashes hold of this process's counts. False while failing open."""
        mode = self._unjoined
        if mode is None:
            return True
        args = [self._ttl_ms, mode, self._shared.writer, *_limit_args(self.budget), self._start_arg()]
        reply = self._run("init", self._keys, args, "be created", counts=True)
        if reply is not None:
            self._unjoined = None
            stored = _stored_limits(reply, len(self._keys))
            self._limits, self._ancestor_limits = stored[0], stored[1:]
            self.budget = _budget_from_args(self._limits)
            for enclosing, ancestor_limits in zip(self._enclosing, self._ancestor_limits, strict=True):
                enclosing.budget = _budget_from_args(ancestor_limits)
        elif mode == "2":
            self._limits = None  # failing open: nothing adopted
        self._keep_until_made()
        return reply is not None

    def _keep_until_made(self) -> None:
        """Keep this ledger while Redis does not have its run's creation or budget (see unmade)."""
        shared = self._shared
        with shared.lock:
            if self._unjoined == "0" or self._budget_unsent:
                shared.unmade.add(self)
            else:
                shared.unmade.discard(self)

    # -- the interface of RunLedger ---------------------------------------------

    parent: None = None
    """Always None: the enclosing runs are named by ``ancestor_ids``."""

    @property
    def url(self) -> str:
        """The Redis server, as a URL without password."""
        return self._shared.url

    @property
    def cost_usd(self) -> float:
        return self.cost_units / COST_UNITS_PER_USD

    @property
    def started(self) -> float:
        """When the run started (first created in Redis), on this process's clock."""
        with self._lock:
            return self._local_time(self._started_us)

    def _local_time(self, server_us: int) -> float:
        """A time on the Redis server's clock, on this process's clock (call with the lock held)."""
        return self._at - (self._server_now_us - server_us) / _US_PER_SECOND

    @property
    def deadline(self) -> float:
        """When the max_duration_seconds of this run or of an enclosing run runs out, whichever
        comes first, on this process's clock (infinity without one)."""
        return min(_own_deadline(ledger) for ledger in self.chain())

    def _now_and_start(self) -> tuple[float, float]:
        """The time now and when the run started on the Redis server, on this process's clock."""
        return self._clock(), self.started

    def set_budget(self, budget: Budget | None) -> None:
        """Enforce ``budget`` from now on, in every process (it replaces the stored limits).

        Failing closed, the LedgerUnavailableError leaves the budget as it was: a command that
        timed out is taken back by this ledger's next command (if Redis ran it late meanwhile,
        and no budget was set since, the budget before it comes back)."""
        before = self.budget, self._limits
        self.budget = budget
        self._limits = _limit_args(budget)
        command = _new_writer()
        args = [self._ttl_ms, "1", self._shared.writer, *self._limits, self._start_arg(), command]
        try:
            reply = self._run("init", [self.key], args, "set its budget", counts=True)
        except LedgerUnavailableError:
            self.budget, self._limits = before
            with self._lock:
                self._revokes.append((command, before[1]))
            raise
        self._budget_unsent = reply is None
        self._keep_until_made()

    def begin_step(self, check: bool = True) -> None:
        """Send what this process counted and Redis does not have, then count one more step in
        this run and its ancestors.

        One round trip to Redis. With ``check``, raise BudgetExceededError
        instead of counting the step if any of them has reached a limit (the
        step about to start counts towards max_steps).
        """
        reply = None
        if self._join():  # made while failing open, it first joins the run once Redis answers
            args = ["1" if check else "0", self._ttl_ms, self._shared.writer, *self._key_args()]
            reply = self._run("begin_step", self._keys, args, "start a step", counts=True)
        if reply is None:  # failing open
            self._begin_step_locally(check)
        elif reply[0] == 0:
            index, limit, used, maximum = reply[-4:]
            raise _refusal(_text(limit), int(used), _text(maximum), self._ids()[int(index) - 1])

    def charge(self, tokens: int, cost_units: int, unpriced: bool = False) -> None:
        """Add one usage report, here and in every ancestor run.

        Counted in this process at once; sent to Redis with the next
        ``begin_step``, ``count_sub_agent`` or ``refresh`` (no round trip of its own).
        """
        for ledger in self.chain():
            with ledger._lock:
                ledger.tokens += tokens
                ledger.cost_units += cost_units
                ledger.unpriced_reports += 1 if unpriced else 0
        shared = self._shared
        with shared.lock:
            for tally in self._tallies:
                counted = tally.counted
                counted[_TOKENS] = min(counted[_TOKENS] + int(tokens), MAX_TOTAL)
                counted[_COST] = min(counted[_COST] + int(cost_units), MAX_TOTAL)
                counted[_UNPRICED] += 1 if unpriced else 0
                shared.unsettled[tally.key] = self

    def count_sub_agent(self) -> None:
        """Count one more sub-agent, here and in every ancestor run (and send what is pending)."""
        if self._add("1", "count a sub-agent") is None:
            for ledger in self.chain():
                with ledger._lock:
                    ledger.sub_agents += 1
            self._count_here(_SUB_AGENTS)

    def flush(self) -> None:
        """Send what this process counted and Redis does not have (nothing to do if there is none),
        and what it could not send while failing open: the run's creation and its budget."""
        self._join()
        if self._budget_unsent:
            self.set_budget(self.budget)
        if self._pending():
            self._add("0", "record its usage")

    def unsent(self) -> bool:
        """Whether this process counted into this run (or made it, or set its budget) what Redis
        does not hold."""
        return self._unjoined == "0" or self._budget_unsent or self._pending()

    def _pending(self) -> bool:
        """Whether this process counted into this run or its ancestors what Redis does not hold."""
        with self._shared.lock:
            return any(tally.counted != tally.held for tally in self._tallies)

    def _add(self, sub_agents: str, action: str) -> list[Any] | None:
        """One "add" round trip: what is pending, and ``sub_agents``."""
        if not self._join():
            return None
        args = [sub_agents, self._ttl_ms, self._shared.writer, *self._key_args()]
        return self._run("add", self._keys, args, action, counts=True)

    def _key_args(self) -> list[str]:
        """For each key, what the scripts need to re-create its hash (limits and start, when known)
        and to add this process's counts to it exactly once (see ``take_counts``)."""
        args: list[str] = []
        for i, key in enumerate(self._keys):
            ledger = self if i == 0 else self._shared.live.get(key)
            if ledger is None:
                limits, started = self._ancestor_limits[i - 1], self._enclosing[i - 1]._started_us
                start = "" if started is None else str(started)
            else:
                limits, start = ledger._limits, ledger._start_arg()
            if limits is None:
                args.extend(_UNKNOWN_LIMITS)
            else:
                args.extend(("1", *limits, start))
        with self._shared.lock:
            for tally in self._tallies:
                args.extend(tally.args())
        return args

    def _start_arg(self) -> str:
        """The run's start for a script that may create its hash (see start_of in the scripts): on
        the server's clock once a reply gave it, else how long ago this ledger was made, for a run
        made while Redis could not be reached (its duration runs from then, not from when it
        answered again)."""
        started = self._started_us
        if started:
            return str(started)
        age_us = int((self._clock() - self._at) * _US_PER_SECOND)
        return f"-{age_us}" if age_us > 0 else ""

    def _count_here(self, counter: int) -> None:
        """Count one step or sub-agent that Redis did not (failing open), to send it later."""
        shared = self._shared
        with shared.lock:
            for tally in self._tallies:
                tally.counted[counter] += 1
                shared.unsettled[tally.key] = self

    def restore(self, tokens: int, cost_units: int, steps: int, unpriced_reports: int = 0) -> None:
        """Start from what an earlier attempt of this run already spent.

        Each total becomes at least the given one, as in RunLedger: when several
        processes resume the run, or the run's hash still holds the earlier
        attempt's totals, nothing is counted twice.
        """
        totals = (tokens, cost_units, steps, unpriced_reports)
        args = [self._ttl_ms, *(str(min(int(total), MAX_TOTAL)) for total in totals)]
        if self._run("restore", [self.key], args, "restore its spend") is None:
            with self._lock:
                self.tokens = max(self.tokens, tokens)
                self.cost_units = max(self.cost_units, cost_units)
                self.steps = max(self.steps, steps)
                self.unpriced_reports = max(self.unpriced_reports, unpriced_reports)
            with self._shared.lock:  # a hash Redis does not have yet starts from them
                _higher(self._tallies[0].seen, (tokens, cost_units, steps, 0, unpriced_reports))

    def refresh(self) -> None:
        """Send what is pending and fetch the run's current totals from Redis (one round trip)."""
        if self._pending():
            self._add("0", "record its usage")
        else:
            self._run("read", self._keys, [self._shared.writer], "read its totals", counts=True)

    def status(self, budget: Budget | None) -> BudgetStatus:
        """A snapshot of spend against ``budget``, with totals fetched from Redis."""
        self.refresh()
        return super().status(budget)

    # -- Redis ----------------------------------------------------------------

    def _ids(self) -> tuple[str, ...]:
        return (self.run_id, *self.ancestor_ids)

    def _run(
        self, name: str, keys: list[str], args: list[str], action: str, counts: bool = False
    ) -> list[Any] | None:
        """Run a script and take in its totals (and with ``counts``, what the hash holds of this
        process's counts); None when failing open (count locally instead)."""
        shared = self._shared
        if self._fail_open and not shared.may_try(self._clock()):
            return None
        if self._revokes and name != "revoke":
            self._take_back_budgets(action)
        script = _SCRIPTS[name]
        try:
            if not shared.loaded:
                self._load_scripts()
            try:
                reply = self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except shared.no_script:  # the server restarted or ran SCRIPT FLUSH
                self._load_scripts()
                reply = self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except shared.errors as exc:
            refused = isinstance(exc, shared.refused)
            if not self._fail_open:
                raise LedgerUnavailableError(shared.url, self.run_id, action, exc, refused) from exc
            with shared.lock:
                first = not shared.local
                shared.local = True
                shared.retry_at = self._clock() + RETRY_SECONDS
            if first:
                _logger.warning(
                    "multirun: the shared budget ledger at %s %s (%s: %s); failing open: "
                    "each process now counts its own steps and spend, so the budget is no longer "
                    "enforced across processes (Redis is tried again every %g s)%s",
                    shared.url,
                    ACCESS_REFUSED if refused else "is unavailable",
                    type(exc).__name__,
                    exc,
                    RETRY_SECONDS,
                    f". {ACCESS_HINT}" if refused else "",
                )
            return None
        reply = list(reply)
        self._take_totals(reply, keys, counts)
        if shared.local:
            self._resume()
        return reply

    def _take_back_budgets(self, action: str) -> None:
        """Take back the budgets whose set_budget timed out (see _REVOKE): the caller was told
        they were not set. Raises LedgerUnavailableError (naming ``action``) if Redis does not
        answer: this ledger's command would not run either."""
        while True:
            with self._lock:  # another thread may take the last one back meanwhile
                if not self._revokes:
                    return
                command, limits = self._revokes[0]
            known = ("0",) if limits is None else ("1", *limits)
            if self._run("revoke", [self.key], [self._ttl_ms, command, *known], action) is None:
                return  # failing open: tried again with a later command
            with self._lock:  # another thread may have taken it back too
                if self._revokes and self._revokes[0][0] == command:
                    self._revokes.pop(0)

    def _resume(self) -> None:
        """Redis answers again: share again, and send what every ledger of this client counted
        meanwhile (this one's went with the command that found Redis back)."""
        shared = self._shared
        with shared.lock:
            resumed, shared.local = shared.local, False
        if not resumed:
            return
        _logger.warning(
            "multirun: the shared budget ledger at %s answers again; what this process counted "
            "meanwhile is sent, and the budget is enforced across processes again",
            shared.url,
        )
        for ledger in shared.ledgers():
            try:
                ledger.flush()
            except LedgerUnavailableError as exc:  # a fail-closed ledger: it sends it with its next step
                _logger.warning("multirun: usage of run %s not sent to the ledger: %s", ledger.run_id, exc)

    def _load_scripts(self) -> None:
        """SCRIPT LOAD every script, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        for script in _SCRIPTS.values():
            pipe.script_load(script.source)
        shas = [_text(sha) for sha in pipe.execute()]
        if shas != [s.sha for s in _SCRIPTS.values()]:  # pragma: no cover - a server that hashes otherwise
            raise RuntimeError(f"Redis returned unexpected script hashes {shas}")
        self._shared.loaded = True

    def _take_totals(self, reply: list[Any], keys: list[str], counts: bool) -> None:
        """Update this ledger, the ancestors' ledgers in this process and the tallies of ``keys``
        from a script's reply."""
        at = self._clock()
        now_us = int(reply[1])
        fields = [
            [int(v) for v in reply[start : start + _FIELDS_PER_KEY]]
            for start in range(3, 3 + len(keys) * _FIELDS_PER_KEY, _FIELDS_PER_KEY)
        ]
        shared = self._shared
        with shared.lock:
            for i, values in enumerate(fields):
                tally = self._tallies[i]
                held = _text(reply[3 + len(fields) * _FIELDS_PER_KEY + i]).split() if counts else []
                if held or not tally.wrote:  # else a hash created again, not by this process yet:
                    _higher(tally.seen, values[:_COUNTS])  # what it saw before is what comes back
                if counts:
                    tally.wrote = tally.wrote or bool(held)
                    tally.take([int(v) for v in held] if held else [0] * _COUNTS)
                    if tally.counted == tally.held:
                        shared.unsettled.pop(tally.key, None)
        for i, (key, values) in enumerate(zip(keys, fields, strict=True)):
            ledger: RedisLedger | _Enclosing | None = self if i == 0 else self._shared.live.get(key)
            if ledger is None:
                ledger = self._enclosing[i - 1]
            ledger._update(values, now_us, at)

    def _update(self, values: list[int], now_us: int, at: float) -> None:
        started_us = values[_STARTED]
        with self._lock:
            _take_higher_totals(self, values)
            if started_us >= 0 and now_us >= self._server_now_us:
                self._started_us, self._server_now_us, self._at = started_us, now_us, at

    # -- failing open -----------------------------------------------------------

    def chain(self) -> list[RedisLedger | _Enclosing]:
        """This ledger, then its enclosing runs': their ledgers in this process, or for those
        that live in another one what this ledger knows of them (budget, totals, start)."""
        chain: list[RedisLedger | _Enclosing] = [self]
        for key, enclosing in zip(self._keys[1:], self._enclosing, strict=True):
            ledger = self._shared.live.get(key)
            chain.append(enclosing if ledger is None else ledger)
        return chain

    def _begin_step_locally(self, check: bool) -> None:
        refused = self.over_budget(next_step=True) if check else None
        if refused is not None:
            raise refused
        for ledger in self.chain():
            with ledger._lock:
                ledger.steps += 1
        self._count_here(_STEPS)


_STARTED = 5  # in a run's fields as a reply gives them: its start, in server microseconds


def _take_higher_totals(ledger: RedisLedger | _Enclosing, values: list[int]) -> None:
    """Take a reply's totals (``values``: a run's fields, as the script returns them) where they
    are higher: replies of concurrent calls may arrive out of order, and totals only grow. Call
    with ``ledger``'s lock held."""
    tokens, cost_units, steps, sub_agents, unpriced = values[:_STARTED]
    ledger.tokens = max(ledger.tokens, tokens)
    ledger.cost_units = max(ledger.cost_units, cost_units)
    ledger.steps = max(ledger.steps, steps)
    ledger.sub_agents = max(ledger.sub_agents, sub_agents)
    ledger.unpriced_reports = max(ledger.unpriced_reports, unpriced)


class _Enclosing(LedgerReadings):
    """An enclosing run whose ledger lives in another process, as a RedisLedger of its sub-run
    sees it: the budget stored when that ledger was made, the totals of its last round trip plus
    what it charged since. A retry's checks (``used_up``, ``deadline``), made without a round
    trip, hold the sub-run to that run's limits too."""

    __slots__ = (
        "_lock",
        "_owner",
        "_started_us",
        "budget",
        "cost_units",
        "run_id",
        "steps",
        "sub_agents",
        "tokens",
        "unpriced_reports",
    )

    def __init__(self, run_id: str, owner: RedisLedger) -> None:
        self.run_id = run_id
        self.budget: Budget | None = None
        self._owner = owner
        self._lock = threading.Lock()
        self._started_us: int | None = None
        self.tokens = self.cost_units = self.steps = self.sub_agents = self.unpriced_reports = 0

    def _now_and_start(self) -> tuple[float, float]:
        owner = self._owner
        with owner._lock:
            started_us = owner._started_us if self._started_us is None else self._started_us
            return owner._clock(), owner._local_time(started_us)

    def chain(self) -> Sequence[LedgerReadings]:
        return (self,)

    def _update(self, values: list[int], now_us: int, at: float) -> None:
        started_us = values[_STARTED]
        with self._lock:
            _take_higher_totals(self, values)
            if started_us >= 0:
                self._started_us = started_us


def _own_deadline(ledger: LedgerReadings) -> float:
    """When the max_duration_seconds of ``ledger``'s own budget runs out, on this process's clock."""
    budget = ledger.budget
    if budget is None or budget.max_duration_seconds is None:
        return float("inf")
    return ledger._now_and_start()[1] + budget.max_duration_seconds


def _refusal(limit: str, used: int, maximum: str, run_id: str) -> BudgetExceededError:
    """The BudgetExceededError RunLedger raises for the same limit, from a script's refusal."""
    top = float(maximum) if maximum else math.nan  # nan only if someone edited the hash by hand
    if limit == "max_cost_usd":
        return BudgetExceededError(limit, used / COST_UNITS_PER_USD, top, run_id=run_id)
    if limit == "max_duration_seconds":
        return BudgetExceededError(limit, used / _US_PER_SECOND, top, run_id=run_id)
    return BudgetExceededError(limit, used, int(top) if maximum else top, run_id=run_id)


class RedisLedgerFactory:
    """Makes the RedisLedgers of many runs over one redis client (one connection pool).

    ``new_ledger`` has the signature of ``MultiRunClient.new_ledger``, so a
    client can hand ledger creation to a factory.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        fail_open: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = redis_client
        self.key_prefix = key_prefix
        self.ttl_seconds = ttl_seconds
        self.fail_open = fail_open
        self.clock = clock

    @property
    def url(self) -> str:
        """The Redis server, as a URL without password."""
        return _state_of(self.client).url

    @classmethod
    def from_uri(cls, uri: str, *, clock: Callable[[], float] = time.monotonic) -> RedisLedgerFactory:
        """A factory for ``redis://[user:password@]host:port/db?timeout=0.5&fail_open=false``.

        Besides redis-py's own URL parameters (``rediss://`` and ``unix://``
        URLs work too) it takes ``timeout`` (seconds to connect and to wait for
        an answer, default 0.5), ``fail_open`` (default false), ``key_prefix``
        and ``ttl_seconds``. The client does not retry: a step fails (or fails
        open) within the timeout rather than risk counting a command twice.
        The database (the path, or ``db=``) must be an int >= 0: any other
        is refused, where redis-py would quietly use database 0.
        """
        try:
            parts = urlsplit(uri)
        except ValueError as exc:  # an unclosed [ of an IPv6 address
            raise ConfigurationError(f"ledger URL is not a valid redis URL: {exc}") from None
        if parts.scheme not in ("redis", "rediss", "unix"):  # before the import: a typo needs no redis
            raise ConfigurationError(
                f"ledger URL must be redis://, rediss:// or unix://, got {redact(uri)!r}"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        _check_database(parts, query, uri)
        try:
            import redis.backoff
            import redis.retry
        except ImportError:
            raise ConfigurationError(
                "a redis:// ledger needs the redis package: pip install 'multirun-otel[redis]'"
            ) from None
        ours = {"timeout": str(DEFAULT_TIMEOUT_SECONDS), "fail_open": "false"}
        theirs = []
        for name, value in query:
            if name in ("timeout", "fail_open", "key_prefix", "ttl_seconds"):
                ours[name] = value
            else:
                theirs.append((name, value))
        timeout = _positive(ours["timeout"], "timeout", uri, MAX_TIMEOUT_SECONDS)
        redis_py: Any = redis  # Any: redis-py 5 leaves from_url and Retry untyped
        try:
            client: redis.Redis = redis_py.Redis.from_url(
                _with_query(parts, urlencode(theirs)),
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=redis_py.retry.Retry(redis_py.backoff.NoBackoff(), 0),
                health_check_interval=30,  # a PING before reusing a connection idle that long
            )
        except ValueError as exc:  # a port that is no number, a bad parameter: redis-py's own words
            raise ConfigurationError(f"ledger URL is not a valid redis URL: {exc}") from None
        _check_parameters(client, uri)
        return cls(
            client,
            key_prefix=ours.get("key_prefix", DEFAULT_KEY_PREFIX),
            ttl_seconds=_positive(
                ours.get("ttl_seconds", str(DEFAULT_TTL_SECONDS)), "ttl_seconds", uri, MAX_TTL_SECONDS
            ),
            fail_open=_boolean(ours["fail_open"], uri),
            clock=clock,
        )

    def ledger(
        self,
        run_id: str,
        budget: Budget | None = None,
        ancestor_ids: Iterable[str] = (),
        *,
        adopt: bool = False,
    ) -> RedisLedger:
        """The ledger of ``run_id``; ``ancestor_ids`` are the enclosing runs, nearest first.

        ``adopt``: the run was started by another process (it is continued here), which
        creates its hash with its limits; this one joins it, and re-creates it only if the
        server lost it later (with the limits it read when it joined).
        """
        return RedisLedger(
            self.client,
            run_id,
            budget,
            ancestor_ids,
            key_prefix=self.key_prefix,
            ttl_seconds=self.ttl_seconds,
            fail_open=self.fail_open,
            clock=self.clock,
            adopt=adopt,
        )

    def new_ledger(
        self,
        parent: RunLedger | RedisLedger | None,
        budget: Budget | None = None,
        run_id: str = "",
        ancestor_ids: Iterable[str] = (),
        *,
        adopt: bool = False,
    ) -> RunLedger | RedisLedger:
        """Like ``MultiRunClient.new_ledger``; without a run id (a placeholder) it is a RunLedger."""
        if not run_id:
            return RunLedger(None, self.clock, budget=budget)
        ancestors: list[str] = list(ancestor_ids) if parent is None else []
        if isinstance(parent, RedisLedger):
            ancestors = [parent.run_id, *parent.ancestor_ids]
        else:
            while parent is not None:
                if parent.run_id:
                    ancestors.append(parent.run_id)
                parent = parent.parent
        return self.ledger(run_id, budget, ancestors, adopt=adopt)

    def send_pending(self) -> bool:
        """Send what the ledgers of this client still have pending; False if Redis did not take
        it all (one warning names the runs).

        A fail-open client tries Redis once more, whatever its back-off: it may be now or never.
        Once Redis has failed to answer, the other ledgers do not try: each would wait out the
        timeout in turn.
        """
        state = _state_of(self.client)
        failure: BaseException | None = None
        unsent = []
        with state.sending:
            with state.lock:
                state.retry_at = -math.inf
            for ledger in state.ledgers():
                if failure is None:
                    try:
                        ledger.flush()  # failing open, it gives up at once after one that failed
                    except LedgerUnavailableError as exc:
                        failure = exc.__cause__ or exc
                if ledger.unsent():
                    unsent.append(ledger.run_id)
        if unsent:
            _logger.warning(
                "multirun: the shared budget ledger at %s did not answer: what this process counted "
                "into %d run(s) is not in it (%s)%s",
                state.url,
                len(unsent),
                ", ".join(unsent),
                "" if failure is None else f": {type(failure).__name__}: {failure}",
            )
        return not unsent

    def close(self) -> bool:
        """``send_pending``, then close the client's connections (a ledger used after that opens
        new ones); what ``send_pending`` returned."""
        sent = self.send_pending()
        client: Any = self.client  # Any: redis-py 5 leaves close untyped
        client.close()
        return sent


def redact(uri: str) -> str:
    """``uri`` with its password replaced by ``***``.

    Only the user information is rewritten: the host and port stay as written, so a URL
    whose port is no number (refused later, with this text in the message) is redacted too.
    """
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return uri
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _with_query(parts: SplitResult, query: str) -> str:
    """The URL of ``parts`` with another query. Not ``urlunsplit``: it writes a URL with no
    host as ``unix:/path``, which redis-py does not take for ``unix://``."""
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return f"{url}?{query}" if query else url


def _check_database(parts: SplitResult, query: Sequence[tuple[str, str]], uri: str) -> None:
    """Refuse a database that is no int >= 0, or that is given twice with two numbers.

    redis-py reads the path's digits as it can and falls back to database 0 quietly
    (``/abc`` and ``/0/extra`` are database 0, ``/1/2`` is 12), and ``?db=`` wins over the
    path: two programs meant to keep their budgets apart would share one database.
    """
    numbers = set()
    for name, value in query:
        if name == "db":
            if not (value.isascii() and value.isdigit()):
                raise ConfigurationError(f"ledger URL {redact(uri)!r}: db must be an int >= 0, got {value!r}")
            numbers.add(int(value))
    path = unquote(parts.path)
    if parts.scheme != "unix" and path not in ("", "/"):  # a unix:// path is the socket's
        number = path[1:]
        if not (number.isascii() and number.isdigit()):
            raise ConfigurationError(
                f"ledger URL {redact(uri)!r}: the path must be the database number, an int >= 0 "
                f"(redis://host:6379/0), got {path!r}"
            )
        numbers.add(int(number))
    if len(numbers) > 1:
        raise ConfigurationError(
            f"ledger URL {redact(uri)!r}: the database is given twice, as "
            f"{' and '.join(map(str, sorted(numbers)))}: it must be given once"
        )


def _check_parameters(client: redis.Redis, uri: str) -> None:
    """Refuse a URL parameter that neither multirun nor the connection takes: redis-py passes any
    name on, and the first step would fail with a TypeError (failing open too) on a typo."""
    pool = client.connection_pool
    accepted: set[str] = set()
    for klass in pool.connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    unknown = sorted(set(pool.connection_kwargs) - accepted)
    if unknown:
        raise ConfigurationError(
            f"ledger URL {redact(uri)!r}: unknown parameter {unknown[0]!r} (multirun takes timeout, "
            "fail_open, key_prefix and ttl_seconds; the others go to the redis connection, "
            f"{pool.connection_class.__name__}, which does not take it)"
        )


def _positive(value: str, name: str, uri: str, maximum: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number <= maximum:
        raise ConfigurationError(
            f"ledger URL {redact(uri)!r}: {name} must be a number > 0 and at most {maximum:g}, got {value!r}"
        )
    return number


def _boolean(value: str, uri: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"ledger URL {redact(uri)!r}: fail_open must be true or false, got {value!r}")


if TYPE_CHECKING:  # mypy checks that both ledgers provide the Ledger interface

    def _both_are_ledgers(local: RunLedger, shared: RedisLedger) -> tuple[Ledger, Ledger]:
        return local, shared
