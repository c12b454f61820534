// qgate inbox. Plain script, no dependencies, no build step.
//
// The reviewer's token lives in this tab's sessionStorage and goes only into
// the Authorization header of calls to this agent's /v1 API. Every value
// from the API is put on the page as text (textContent), never as markup.
'use strict';

const TOKEN_KEY = 'qgate.token';
const FOLD_LINES = 12;
const FOLD_CHARS = 900;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,
  /** Requests seen on this page, by id. */
  requests: new Map(),
  /** Ids decided while the page was open (shown below the pending ones). */
  decidedHere: [],
  stream: null,
  live: false,
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const $ = (id) => document.getElementById(id);
/** Replaces `parent`'s children, skipping absent ones (null would show as "null"). */
const fill = (parent, ...children) => parent.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function say(text) {
  $('status').textContent = text;
}

function when(rfc3339) {
  if (!rfc3339) return '';
  const d = new Date(rfc3339);
  return isNaN(d) ? rfc3339 : d.toLocaleString();
}

function timeLeft(rfc3339) {
  const ms = Date.parse(rfc3339) - Date.now();
  if (isNaN(ms)) return '';
  if (ms <= 0) return 'expiring now';
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return 'expires in ' + (h ? h + ' h ' : '') + (h || m ? m + ' min ' : '') + r + ' s';
}

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

async function api(path, options) {
  const opts = Object.assign({ cache: 'no-store' }, options || {});
  opts.headers = Object.assign({ Authorization: 'Bearer ' + state.token }, opts.headers || {});
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, 'network', 'The agent did not answer (' + e.message + ')');
  }
  const type = res.headers.get('content-type') || '';
  const body = type.includes('json') ? await res.json().catch(() => null) : await res.text();
  if (res.status === 401) {
    logout('The agent refused this token (mistyped, or revoked). Log in again.');
    throw new ApiError(401, 'unauthorized', 'not logged in');
  }
  if (!res.ok) {
    const message = body && body.message ? body.message : res.status + ' ' + res.statusText;
    throw new ApiError(res.status, body && body.error, message);
  }
  return body;
}

// ---------------------------------------------------------- SQL rendering

const KEYWORDS = new Set(('select from where and or not insert into values update set delete ' +
  'create drop alter table index view function procedure trigger schema database role user grant ' +
  'revoke truncate join left right inner outer full cross natural on using group by order having ' +
  'limit offset union all distinct as case when then else end is null in exists between like ilike ' +
  'begin commit rollback savepoint release transaction with returning do nothing conflict copy to ' +
  'cascade restrict if primary key references foreign default add column rename owner comment ' +
  'analyze explain vacuum lock call execute prepare deallocate show reset true false asc desc ' +
  'lateral merge matched security definer language returns replace temporary temp unlogged ' +
  'sequence extension policy only for share nowait skip locked').split(/\s+/));

// One alternative per token kind; the first group that matched names it.
const TOKEN = new RegExp([
  '(--[^\\n]*|/\\*[\\s\\S]*?(?:\\*/|$))', // 1 comment
  "((?:[eEbBxXuU]&?)?'(?:[^']|'')*'?)", // 2 string
  '(\\$([A-Za-z_][A-Za-z0-9_]*)?\\$[\\s\\S]*?(?:\\$\\4\\$|$))', // 3 dollar quote (4: its tag)
  '("(?:[^"]|"")*"?)', // 5 quoted name
  '(\\b\\d+(?:\\.\\d+)?(?:[eE][-+]?\\d+)?\\b)', // 6 number
  '([A-Za-z_][A-Za-z0-9_$]*)', // 7 word
].join('|'), 'g');

function highlight(sql) {
  const out = [];
  let last = 0;
  for (const m of sql.matchAll(TOKEN)) {
    if (m.index > last) out.push(document.createTextNode(sql.slice(last, m.index)));
    let cls = null;
    if (m[1]) cls = 'com';
    else if (m[2] || m[3]) cls = 'str';
    else if (m[5]) cls = 'qid';
    else if (m[6]) cls = 'num';
    else if (m[7] && KEYWORDS.has(m[7].toLowerCase())) cls = 'kw';
    out.push(cls ? el('span', { class: cls, text: m[0] }) : document.createTextNode(m[0]));
    last = m.index + m[0].length;
  }
  if (last < sql.length) out.push(document.createTextNode(sql.slice(last)));
  return out;
}

function statementBlock(sql, foldable) {
  const pre = el('pre', { class: 'sql' }, el('code', {}, highlight(sql)));
  const lines = sql.split('\n').length;
  if (!foldable || (lines <= FOLD_LINES && sql.length <= FOLD_CHARS)) return pre;
  pre.classList.add('folded');
  const button = el('button', {
    type: 'button', class: 'fold', 'aria-expanded': 'false',
    text: 'Show the whole statement (' + lines + ' lines, ' + sql.length + ' characters)',
  });
  button.addEventListener('click', () => {
    const open = pre.classList.toggle('folded') === false;
    button.setAttribute('aria-expanded', String(open));
    button.textContent = open ? 'Fold the statement' :
      'Show the whole statement (' + lines + ' lines, ' + sql.length + ' characters)';
  });
  return el('div', {}, pre, button);
}

// ------------------------------------------------------------ a request

function refusalFor(r) {
  const me = state.me;
  if (!me) return null;
  if (me.role === 'auditor') return 'Auditors read requests; they do not decide them.';
  const user = r.identity && r.identity.db_user;
  if (user && (me.db_users || []).includes(user)) {
    return 'You cannot approve this: it was sent as database user ' + user +
      ', which is you. Another reviewer must decide it.';
  }
  if (me.role !== 'admin' && r.reviewer_groups.length &&
      !r.reviewer_groups.some((g) => (me.groups || []).includes(g))) {
    return 'Only reviewers in ' + r.reviewer_groups.join(', ') + ' decide this request.';
  }
  return null;
}

function factsList(r) {
  const id = r.identity || {};
  const rows = [
    ['Database user', id.db_user || 'unknown'],
    ['Database', id.database || 'unknown'],
    ['Client', id.client_addr || 'unknown'],
    ['Application', id.application || '—'],
    ['Server', (({ postgresql: 'PostgreSQL', mysql: 'MySQL/MariaDB' })[id.protocol] || 'protocol not recorded') + (id.server ? ' at ' + id.server : '')],
    ['Transport', ({ tcp: 'TCP (plaintext)', tls: 'TLS', gss: 'GSSAPI encryption', unix: 'Unix socket', unknown: 'TCP, seen mid-stream' })[id.transport] || 'not recorded'],
    ['Held by', r.held_by === 'server_hook' ? 'the server hook (backend ' + r.backend_pid + ' stopped)' : 'the wire (tc)'],
    ['Transaction', String(r.transaction_state || 'unknown').replace(/_/g, ' ')],
    ['Created', when(r.created_at)],
  ];
  if (r.estimated_rows !== null && r.estimated_rows !== undefined) {
    rows.push(['Planner estimate', r.estimated_rows + ' rows']);
  }
  if (r.justification) rows.push(['Justification', r.justification]);
  return el('dl', { class: 'facts' }, rows.map(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
}

function reasonsOf(r) {
  const reasons = (r.facts && Array.isArray(r.facts.reasons)) ? r.facts.reasons : [];
  const flags = [];
  for (const s of (r.facts && r.facts.statements) || []) {
    for (const f of s.flags || []) if (!flags.includes(f)) flags.push(f);
  }
  return el('div', { class: 'why' },
    el('p', {}, 'Held by rule ', el('code', { class: 'rule', text: r.rule }),
      flags.length ? ' — flags: ' + flags.join(', ') : ''),
    reasons.length ? el('ul', { class: 'reasons' }, reasons.map((t) => el('li', { text: t }))) : null);
}

function votesOf(r) {
  const done = r.approvals_needed - r.approvals_remaining;
  const progress = el('p', { class: 'approvals' },
    el('progress', { max: r.approvals_needed, value: done, 'aria-label': 'approvals' }),
    ' ' + done + ' of ' + r.approvals_needed + ' approval' + (r.approvals_needed === 1 ? '' : 's'),
    r.reviewer_groups.length ? ' from ' + r.reviewer_groups.join(', ') : '');
  const votes = (r.votes || []).map((v) => el('li', {},
    el('strong', { text: v.reviewer }), ' ' + v.verdict + ' at ' + when(v.at),
    v.comment ? ': “' + v.comment + '”' : ''));
  return [progress, votes.length ? el('ul', { class: 'votes' }, votes) : null];
}

function closingOf(r) {
  if (!r.closing) return null;
  const c = r.closing;
  const verb = { approved: 'Approved', denied: 'Denied', expired: 'Expired', withdrawn: 'Withdrawn' }[r.status] || r.status;
  return el('p', { class: 'closing' },
    verb + (c.by && c.by !== 'qgate' ? ' by ' + c.by : ' by qgate') + ' at ' + when(c.at) +
    (c.forced ? ' (break-glass)' : '') + (c.comment ? ': “' + c.comment + '”' : ''));
}

// A reviewer's half-typed comments, by request id: a card rebuilt while
// they type (its request changed, another request arrived, the event stream
// reconnected) gets its draft back.
const drafts = new Map();

// Runs `render`, then puts the focus (and a text field's selection) back on
// the element with the same id, if it was taken away: replacing or moving a
// focused element blurs it.
function keepingFocus(render) {
  const active = document.activeElement;
  const id = active && active !== document.body ? active.id : '';
  const selection = id && typeof active.selectionStart === 'number'
    ? [active.selectionStart, active.selectionEnd] : null;
  render();
  if (!id) return;
  const again = document.getElementById(id);
  if (!again || again === document.activeElement) return;
  again.focus();
  if (selection && typeof again.setSelectionRange === 'function') again.setSelectionRange(...selection);
}

function decideForm(r) {
  const refusal = refusalFor(r);
  const comment = el('textarea', { id: 'comment-' + r.id, name: 'comment', maxlength: 2000 });
  comment.value = drafts.get(r.id) || '';
  comment.addEventListener('input', () => drafts.set(r.id, comment.value));
  const error = el('p', { class: 'why-not', role: 'alert' });
  const approve = el('button', { type: 'button', class: 'approve', id: 'approve-' + r.id, text: 'Approve' });
  const deny = el('button', { type: 'button', class: 'deny', id: 'deny-' + r.id, text: 'Deny' });
  if (refusal) {
    approve.disabled = true;
    approve.title = refusal;
    error.textContent = refusal;
    if (state.me && state.me.role === 'auditor') deny.disabled = true;
  }
  const send = async (verdict) => {
    approve.disabled = deny.disabled = true;
    error.textContent = '';
    try {
      const body = comment.value.trim() ? JSON.stringify({ comment: comment.value.trim() }) : '{}';
      const out = await api('/v1/requests/' + r.id + '/' + verdict, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body,
      });
      drafts.delete(r.id);
      upsert(out);
      say('Request #' + r.id + ': ' + (verdict === 'approve' ? 'your approval is recorded' : 'denied') + '.');
    } catch (e) {
      error.textContent = e.message;
      approve.disabled = !!refusal;
      deny.disabled = false;
    }
  };
  approve.addEventListener('click', () => send('approve'));
  deny.addEventListener('click', () => send('deny'));
  return el('div', { class: 'decide' },
    el('label', { for: 'comment-' + r.id, text: 'Comment (optional)' }), comment,
    el('div', { class: 'buttons' }, approve, deny), error);
}

function card(r, full) {
  const status = String(r.status);
  return el('article', { class: 'request', id: 'request-' + r.id, 'data-id': r.id, 'data-status': status },
    el('header', {},
      el('h2', {}, el('a', { href: '#/requests/' + r.id, text: 'Request #' + r.id })),
      el('span', { class: 'badge ' + status, text: status.toUpperCase() }),
      status === 'pending' ? el('span', { class: 'expiry', 'data-expires': r.expires_at, text: timeLeft(r.expires_at) }) : null),
    statementBlock(r.statement, !full),
    reasonsOf(r),
    factsList(r),
    votesOf(r),
    closingOf(r),
    status === 'pending' ? decideForm(r) : null);
}

// ------------------------------------------------------------------ views

function setNav(which) {
  for (const [id, name] of [['nav-inbox', 'inbox'], ['nav-audit', 'audit']]) {
    if (name === which) $(id).setAttribute('aria-current', 'page');
    else $(id).removeAttribute('aria-current');
  }
}

function pending() {
  return [...state.requests.values()].filter((r) => r.status === 'pending').sort((a, b) => b.id - a.id);
}

// The request each inbox card was built from (as JSON), by card element.
const cardSigs = new WeakMap();

function renderInbox() {
  if (currentView() !== 'inbox') return;
  setNav('inbox');
  const list = pending();
  $('pending-count').textContent = list.length ? String(list.length) : '';
  const decided = state.decidedHere.map((id) => state.requests.get(id)).filter(Boolean);
  // A card whose request did not change is kept as it is (what the reviewer
  // typed, selected or scrolled stays); only changed and new ones are built.
  const shown = new Map([...document.querySelectorAll('#main article.request')].map((c) => [c.dataset.id, c]));
  const kept = (r) => {
    const sig = JSON.stringify(r);
    const old = shown.get(String(r.id));
    if (old && cardSigs.get(old) === sig) return old;
    const fresh = card(r, false);
    cardSigs.set(fresh, sig);
    return fresh;
  };
  keepingFocus(() => fill($('main'),
    el('h1', {}, 'Held statements'),
    list.length
      ? el('div', { id: 'pending' }, list.map(kept))
      : el('p', { class: 'empty', id: 'pending' }, 'Nothing is waiting for review. New held statements appear here as they are held.'),
    decided.length ? el('section', { class: 'decided' }, el('h2', {}, 'Decided since this page opened'),
      decided.map(kept)) : null));
}

async function renderRequest(id) {
  setNav(null);
  const main = $('main');
  main.replaceChildren(el('p', {}, 'Loading request #' + id + '…'));
  try {
    const r = await api('/v1/requests/' + encodeURIComponent(id));
    state.requests.set(r.id, r);
    main.replaceChildren(el('p', {}, el('a', { href: '#/inbox', text: '← Inbox' })), card(r, true));
  } catch (e) {
    if (e.status !== 401) main.replaceChildren(el('p', { class: 'error', role: 'alert', text: e.message }));
  }
}

const SEARCH_FIELDS = [
  ['user', 'Database user', 'text'],
  ['database', 'Database', 'text'],
  ['table', 'Table', 'text'],
  ['decision', 'Decision', ['', 'allow', 'deny', 'hold', 'none', 'pending', 'approved', 'denied', 'expired', 'withdrawn']],
  ['rule', 'Rule', 'text'],
  ['since', 'Since', 'datetime-local'],
  ['until', 'Until', 'datetime-local'],
];

function searchQuery(form, format) {
  const q = new URLSearchParams();
  for (const [name] of SEARCH_FIELDS) {
    const v = form.elements[name].value.trim();
    if (!v) continue;
    q.set(name, name === 'since' || name === 'until' ? new Date(v).toISOString() : v);
  }
  q.set('limit', format ? '100000' : '200');
  if (format) q.set('format', format);
  return q;
}

async function renderAudit() {
  setNav('audit');
  const main = $('main');
  const verify = el('div', { class: 'verify', id: 'verify', role: 'status', text: 'Checking the audit chain…' });
  const form = el('form', { class: 'search', id: 'search', method: 'post', action: '#' },
    SEARCH_FIELDS.map(([name, label, type]) => el('div', {},
      el('label', { for: 'f-' + name, text: label }),
      Array.isArray(type)
        ? el('select', { id: 'f-' + name, name }, type.map((o) => el('option', { value: o, text: o || 'any' })))
        : el('input', { id: 'f-' + name, name, type, autocomplete: 'off' }))),
    el('div', { class: 'actions' },
      el('button', { type: 'submit', class: 'primary', text: 'Search' }),
      el('button', { type: 'button', id: 'export-jsonl', text: 'Export JSONL' }),
      el('button', { type: 'button', id: 'export-csv', text: 'Export CSV' })));
  const results = el('div', { id: 'results', 'aria-live': 'polite' });
  main.replaceChildren(el('h1', {}, 'Audit'), verify, form, results);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    results.replaceChildren(el('p', {}, 'Searching…'));
    try {
      const rows = await api('/v1/audit/statements?' + searchQuery(form));
      results.replaceChildren(resultsTable(rows));
    } catch (e) {
      if (e.status !== 401) results.replaceChildren(el('p', { class: 'error', role: 'alert', text: e.message }));
    }
  });
  for (const format of ['jsonl', 'csv']) {
    $('export-' + format).addEventListener('click', async () => {
      try {
        const text = await api('/v1/audit/statements?' + searchQuery(form, format));
        const blob = new Blob([typeof text === 'string' ? text : JSON.stringify(text)],
          { type: format === 'csv' ? 'text/csv' : 'application/x-ndjson' });
        const a = el('a', { href: URL.createObjectURL(blob), download: 'qgate-statements.' + format });
        document.body.append(a);
        a.click();
        a.remove();
        say('Exported the current search as ' + format.toUpperCase() + '.');
      } catch (e) {
        if (e.status !== 401) say('Export failed: ' + e.message);
      }
    });
  }
  try {
    const report = await api('/v1/audit/verify');
    verify.classList.add(report.ok ? 'ok' : 'bad');
    verify.textContent = report.ok
      ? 'Audit chain verified: intact (' + describeVerify(report) + ').'
      : 'Audit chain verification FAILED: ' + firstProblem(report);
  } catch (e) {
    if (e.status !== 401) verify.textContent = 'Could not verify the audit chain: ' + e.message;
  }
}

function describeVerify(report) {
  const parts = [report.entries + ' chained entries'];
  if (report.seals) {
    parts.push(report.seals.statements_sealed + ' statements and ' + report.seals.connections_sealed + ' connections sealed');
    const open = report.seals.statements_unsealed + report.seals.connections_unsealed;
    if (open) parts.push(open + ' rows not sealed yet');
  }
  return parts.join(', ');
}

function firstProblem(report) {
  if (report.first_problem) return 'audit chain: ' + JSON.stringify(report.first_problem);
  const s = report.seals && report.seals.first_problem;
  if (s) return s.table + ' row ' + s.id + ': ' + s.what + ' (seal group ' + s.group + ')';
  const r = report.reviewers;
  if (r && r.state === 'changed') {
    return 'the reviewers table was changed outside qgate' + (r.entry ? ' (after audit entry ' + r.entry + ')' : '');
  }
  return JSON.stringify(report);
}

function resultsTable(rows) {
  if (!rows.length) return el('p', { class: 'empty' }, 'No statement matches.');
  const head = ['Received', 'User', 'Database', 'Statement', 'Decision', 'Rule', 'Outcome'];
  return el('div', { class: 'table-wrap' },
    el('p', {}, rows.length + ' statement' + (rows.length === 1 ? '' : 's') + (rows.length >= 200 ? ' (the first 200; export for all)' : '')),
    el('table', { id: 'results-table' },
      el('thead', {}, el('tr', {}, head.map((h, i) => el('th', { class: i === 2 || i === 6 ? 'optional' : null, text: h })))),
      el('tbody', {}, rows.map((s) => el('tr', { 'data-statement': s.statement_id },
        el('td', { text: when(s.received_at) }),
        el('td', { text: s.user || '' }),
        el('td', { class: 'optional', text: s.database || '' }),
        el('td', { class: 'text', text: s.text }),
        el('td', {}, s.decision || 'not asked',
          s.request_id ? [' ', el('a', { href: '#/requests/' + s.request_id, text: '#' + s.request_id })] : null,
          s.request_status ? ': ' + s.request_status + (s.decided_by ? ' by ' + s.decided_by : '') : null),
        el('td', { text: s.rule || '' }),
        el('td', { class: 'optional', text: s.outcome || '' }))))));
}

function renderLogin(message) {
  $('nav').hidden = true;
  $('logout').hidden = true;
  $('live').hidden = true;
  $('whoami').textContent = '';
  const input = el('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true });
  const error = el('p', { class: 'error', role: 'alert', text: message || '' });
  const form = el('form', { class: 'login', id: 'login', method: 'post', action: '#' },
    el('h1', {}, 'Reviewer sign-in'),
    el('p', {}, 'Paste the token `qgate-agent reviewers add` printed for you. It stays in this tab only.'),
    el('label', { for: 'token', text: 'Token' }), input,
    el('p', {}, el('button', { type: 'submit', class: 'primary', text: 'Sign in' })),
    error);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    state.token = input.value.trim();
    input.value = '';
    try {
      await start();
    } catch (e) {
      if (e.status !== 401) error.textContent = e.message;
    }
  });
  $('main').replaceChildren(form);
  input.focus();
}

// ------------------------------------------------------------- live data

function upsert(r) {
  const before = state.requests.get(r.id);
  state.requests.set(r.id, r);
  if (r.status !== 'pending' && (!before || before.status === 'pending') && !state.decidedHere.includes(r.id)) {
    state.decidedHere.unshift(r.id);
    state.decidedHere.length = Math.min(state.decidedHere.length, 20);
  }
  renderCurrent(false);
}

async function refreshPending() {
  const list = await api('/v1/requests?status=pending&limit=1000');
  for (const [id, r] of state.requests) {
    if (r.status === 'pending' && !list.some((x) => x.id === id)) state.requests.delete(id);
  }
  for (const r of list) state.requests.set(r.id, r);
  renderCurrent(false);
}

function setLive(live) {
  state.live = live;
  $('live').hidden = false;
  $('live').textContent = live ? '● live' : '○ reconnecting…';
}

function onEvent(kind, data) {
  if (kind === 'lagged') {
    refreshPending().catch(() => {});
    return;
  }
  let event;
  try {
    event = JSON.parse(data);
  } catch (e) {
    return;
  }
  if (event && event.request) {
    upsert(event.request);
    if (kind === 'created') say('Request #' + event.request.id + ' held: ' + event.request.statement.slice(0, 80));
  }
}

async function stream() {
  if (state.stream) state.stream.abort();
  const ctl = new AbortController();
  state.stream = ctl;
  let backoff = 1000;
  while (!ctl.signal.aborted && state.token) {
    try {
      const res = await fetch('/v1/events', {
        headers: { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' },
        signal: ctl.signal, cache: 'no-store',
      });
      if (res.status === 401) {
        logout('The agent refused this token. Log in again.');
        return;
      }
      if (!res.ok || !res.body) throw new Error('event stream: ' + res.status);
      setLive(true);
      backoff = 1000;
      // Events before this stream opened are not in it: list again.
      await refreshPending();
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let kind = 'message';
          const data = [];
          for (const line of block.split('\n')) {
            if (!line || line.startsWith(':')) continue;
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? '' : line.slice(colon + 1);
            if (value.startsWith(' ')) value = value.slice(1);
            if (field === 'event') kind = value;
            else if (field === 'data') data.push(value);
          }
          if (data.length) onEvent(kind, data.join('\n'));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    setLive(false);
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 15000);
  }
}

// ----------------------------------------------------------------- routing

function currentView() {
  const hash = location.hash || '#/inbox';
  if (hash.startsWith('#/requests/')) return 'request';
  if (hash.startsWith('#/audit')) return 'audit';
  return 'inbox';
}

function renderCurrent(navigated) {
  if (!state.me) return;
  const view = currentView();
  if (view === 'inbox') renderInbox();
  else if (view === 'request') {
    const id = Number(location.hash.slice('#/requests/'.length));
    if (navigated) renderRequest(id);
    else if (state.requests.has(id)) {
      const main = $('main');
      const old = document.getElementById('request-' + id);
      if (old) keepingFocus(() => old.replaceWith(card(state.requests.get(id), true)));
      else if (main) renderRequest(id);
    }
  } else if (navigated) renderAudit();
  $('pending-count').textContent = pending().length ? String(pending().length) : '';
}

async function start() {
  const me = await api('/v1/me');
  state.me = me;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $('nav').hidden = false;
  $('logout').hidden = false;
  $('whoami').textContent = 'Signed in as ' + me.name + ' (' + me.role + (me.groups.length ? ', ' + me.groups.join(', ') : '') + ')';
  await refreshPending();
  renderCurrent(true);
  stream();
}

function logout(message) {
  if (state.stream) state.stream.abort();
  state.stream = null;
  state.token = null;
  state.me = null;
  state.requests.clear();
  state.decidedHere = [];
  sessionStorage.removeItem(TOKEN_KEY);
  renderLogin(message);
}

window.addEventListener('hashchange', () => renderCurrent(true));
document.addEventListener('DOMContentLoaded', () => {
  $('logout').addEventListener('click', () => logout('Signed out.'));
  setInterval(() => {
    for (const e of document.querySelectorAll('[data-expires]')) e.textContent = timeLeft(e.dataset.expires);
  }, 1000);
  if (state.token) start().catch((e) => { if (e.status !== 401) renderLogin(e.message); });
  else renderLogin();
});
