// IsoBox trusted library, part 3: the event loop (timers, queueMicrotask, host functions),
// streams, and session state. Parsed only by runs that touch a timer, bind host functions,
// stream, or run in a session. Like cold.js it may load after user code ran, so it keeps the
// prelude's captured intrinsics (S) for its own control flow; a script that replaced built-ins
// can only break its own run, inside its own budget. Python drives it: after every turn the
// engine asks `.poll` what is pending, fires due timers (`.fire`), hands host replies back
// (`.settle`) and pulls stream values (`.pump`).
(function (S, H) {
  'use strict';
  const { ap, JS, JP, P, dp, G } = S;
  const then = P.prototype.then, keys = Object.keys, hasOwn = Object.hasOwn;
  const indexOf = String.prototype.indexOf, slice = String.prototype.slice, Err = Error;
  const TypeErr = TypeError, RangeErr = RangeError, SynErr = SyntaxError, M = Map;
  const mGet = M.prototype.get, mSet = M.prototype.set, mDel = M.prototype.delete, mVals = M.prototype.values;
  const perf = typeof performance === 'object' && performance && performance.now;
  const now = perf ? () => ap(perf, performance, []) : Date.now;
  const ASYNC_IT = Symbol.asyncIterator, IT = Symbol.iterator;
  const hot = H();
  const C = () => S.cold || (S.cold = S.lib(S.coldSrc)(S, H));
  const BATCH_MS = 1, BATCH_BYTES = 1 << 20;
  const fail = (e) => { if (S.unc === null) S.unc = { e }; };

  // -- timers ------------------------------------------------------------------------------
  // id -> { fn, args, due, every, seq }; seq orders timers due at the same instant.
  let timers = new M(), tid = 0, seq = 0;
  function addTimer(fn, ms, args, every) {
    if (typeof fn !== 'function') throw new TypeErr('the callback must be a function');
    if (timers.size >= S.lim.timers) throw trim(new RangeErr('too many pending timers (the limit is ' + S.lim.timers + ')'), 2);
    ms = +ms;
    if (!(ms >= 1) || ms > 2147483647) ms = 1;
    const id = ++tid;
    ap(mSet, timers, [id, { fn, args, due: now() + ms, every: every ? ms : 0, seq: ++seq }]);
    return id;
  }
  function nextTimer() {
    let best = null;
    for (const t of ap(mVals, timers, [])) if (best === null || t.due < best.due || (t.due === best.due && t.seq < best.seq)) best = t;
    return best;
  }
  function isoboxFire() {
    let id = 0, t = null;
    for (const [k, v] of timers) if (t === null || v.due < t.due || (v.due === t.due && v.seq < t.seq)) { id = k; t = v; }
    if (t === null || t.due > now()) return 'none';
    if (t.every) { t.due = now() + t.every; t.seq = ++seq; } else ap(mDel, timers, [id]);
    try { ap(t.fn, G, t.args); } catch (e) { fail(e); }
    return 'ok';
  }
  const clear = (id) => { ap(mDel, timers, [id]); };
  const api = {
    setTimeout: (fn, ms, ...args) => addTimer(fn, ms, args, false),
    setInterval: (fn, ms, ...args) => addTimer(fn, ms, args, true),
    clearTimeout: clear,
    clearInterval: clear,
    queueMicrotask: (fn) => {
      if (typeof fn !== 'function') throw new TypeErr('the callback must be a function');
      ap(then, P.resolve(), [() => { try { fn(); } catch (e) { fail(e); } }]);
    },
  };

  // -- host functions ----------------------------------------------------------------------
  let cid = 0, calls = 0, outbox = [];
  const pend = new M();
  const split = String.prototype.split, join = Array.prototype.join, aslice = Array.prototype.slice;
  function trim(e, n) {
    // Errors made here should point at the user's call, not at this library: drop n frames.
    try { dp(e, 'stack', { value: ap(join, ap(aslice, ap(split, e.stack, ['\n']), [n]), ['\n']), writable: true, configurable: true }); } catch (_) { /* keep it */ }
    return e;
  }
  function encArgs(name, a) {
    let t, path = null;
    try { t = hot.enc(a); } catch (e) { path = C().describe(a, 'arguments'); }
    // A Date the host cannot hold (Invalid, or outside years 1-9999) is caught here too, so
    // the error names the argument.
    if (path === null && ap(indexOf, t, ['"date"']) >= 0) path = C().badDate(a, 'arguments');
    if (path !== null) throw trim(new TypeErr('host function ' + name + ': ' + path + ', which cannot be passed to the host'), 2);
    return t;
  }
  function reply(name, r) {
    // r: 'j' + JSON, 't' + tagged JSON, or 'e' + JSON {message}
    const k = r[0], body = ap(slice, r, [1]);
    if (k === 'e') { const o = JP(body); const e = trim(new (o.name === 'TypeError' ? TypeErr : Err)(o.message), 2); return { ok: false, e }; }
    const v = JP(body);
    return { ok: true, v: k === 't' ? C().revive(v) : v };
  }
  function counted(name) {
    if (++calls > S.lim.calls) throw trim(new RangeErr('host call limit reached (' + S.lim.calls + ' calls per run)'), 2);
  }
  let bound = [];
  function unbind() {
    // A session keeps its context: the previous run's host functions leave with that run.
    for (let i = 0; i < bound.length; i++) {
      const [name, f] = bound[i];
      try { if (G[name] === f) delete G[name]; } catch (_) { /* the script made it stick */ }
    }
    bound = [];
  }
  function bind(fns) {
    if (S.host === undefined) { S.host = G.__isoboxHost; delete G.__isoboxHost; }
    for (let i = 0; i < fns.length; i++) {
      const name = fns[i][0], isAsync = fns[i][1];
      const f = isAsync
        ? function (...a) {
          try { counted(name); } catch (e) { return P.reject(e); }
          let t;
          try { t = encArgs(name, a); } catch (e) { return P.reject(e); }
          const id = ++cid;
          outbox[outbox.length] = [id, name, t];
          return new P((res, rej) => { ap(mSet, pend, [id, { res, rej, name }]); });
        }
        : function (...a) {
          counted(name);
          const host = S.host;
          if (typeof host !== 'function') throw new Err('host function ' + name + ' is not available in this run');
          const r = reply(name, host(name, encArgs(name, a)));
          if (!r.ok) throw r.e;
          return r.v;
        };
      dp(f, 'name', { value: name });
      dp(G, name, { value: f, writable: true, configurable: true, enumerable: false });
      bound[bound.length] = [name, f];
    }
  }
  function isoboxSettle(a) {
    const m = JP(a), p = ap(mGet, pend, [m[0]]);
    if (p === undefined) return 'ok';
    ap(mDel, pend, [m[0]]);
    let r;
    try { r = reply(p.name, m[1]); } catch (e) { r = { ok: false, e }; }
    if (r.ok) p.res(r.v); else p.rej(r.e);
    return 'ok';
  }

  // -- polling -----------------------------------------------------------------------------
  function poll() {
    // done: what the engine waits for is ready (the run's value, a stream's next value) or an
    // uncaught error from a timer or microtask ended the run.
    const done = S.unc !== null || (S.it !== null ? S.nx !== null : S.st !== null);
    const t = nextTimer();
    const out = outbox;
    outbox = [];
    let calls = '[';
    for (let i = 0; i < out.length; i++) calls += (i ? ',' : '') + '[' + out[i][0] + ',' + JS(out[i][1]) + ',' + JS(out[i][2]) + ']';
    const left = t === null ? -1 : t.due - now();
    return (done ? 'D' : 'W') + (left < 0 && t !== null ? 0 : left) + ' ' + pend.size + ' ' + calls + ']';
  }
  function reset() {
    unbind();
    timers = new M(); outbox = []; calls = 0;
    ap(M.prototype.clear, pend, []);
    S.it = null; S.nx = null; S.busy = false;
  }

  // -- streams -----------------------------------------------------------------------------
  function compiles(src) { try { S.ev(src); return true; } catch (_) { return false; } }
  function genBody(code) {
    // Top-level `yield` makes the snippet a generator body. It is one when it parses as a
    // generator body but not as a plain function body (strict mode reserves `yield` in both,
    // so only a real top-level yield tells them apart); sloppy-only code is tried sloppily.
    if (ap(indexOf, code, ['yield']) < 0) return null;
    const body = '\n' + code + '\n})';
    const heads = ap(indexOf, code, ['await']) >= 0 ? [['(function* isoboxStream() {', '(function () {'], ['(async function* isoboxStream() {', '(async function () {']]
      : [['(function* isoboxStream() {', '(function () {']];
    for (const [g, f] of heads) {
      if (compiles(g + "'use strict';" + body) && !compiles(f + "'use strict';" + body)) return g;
    }
    for (const [g] of heads) if (compiles(g + body) && !compiles('(function () {' + body)) return g;
    return null;
  }
  function streamStart(code) {
    const head = genBody(code);
    if (head === null) return null;
    const fn = S.ev(S.src(head + code + '\n})'));
    S.st = { ok: true, value: fn() };
    return 'D';
  }
  function iterOf(v) {
    if (v !== null && (typeof v === 'object' || typeof v === 'function')) {
      const a = v[ASYNC_IT];
      if (typeof a === 'function') return { it: ap(a, v, []), async: true };
      const s = v[IT];
      if (typeof s === 'function') return { it: ap(s, v, []), async: false };
      if (typeof v.next === 'function') return { it: v, async: false };
    }
    const what = v === null ? 'null' : typeof v;
    throw trim(new TypeErr('run_stream: the snippet neither yields nor evaluates to an iterable (got ' + what + ')'), 1);
  }
  let batch = 1;
  function isoboxPump(a) {
    // One batch of at most n values: 'V' more may follow, 'W' waiting on an async next(),
    // 'D' the iterator is done, 'F' a failure follows the values after a newline.
    const n = +a;
    const items = [];
    let bytes = 0, st = 'V', tail = '';
    const t0 = now(), want = Math.min(n, batch);
    const push = (v) => {
      let t;
      try { t = hot.enc(v); } catch (e) { const f = C().encodeFailure(e, v, 'stream[' + S.idx + ']'); throw { iso: f }; }
      S.idx++;
      if (t === undefined) t = 'null';
      if (t.length > S.lim.result) throw { iso: ['S', C().tooLarge(t.length)] };
      items[items.length] = t;
      bytes += t.length;
    };
    try {
      if (S.it === null) {
        if (S.unc !== null) throw S.unc.e;
        if (S.st === null) throw trim(new Err("the snippet's promise never settled and nothing is left to run"), 1);
        if (!S.st.ok) throw S.st.error;
        const r = iterOf(S.st.value);
        S.it = r.it; S.async = r.async; S.nx = null; S.busy = false; S.idx = 0;
      }
      while (items.length < want && bytes < BATCH_BYTES) {
        if (S.unc !== null) throw S.unc.e;
        let r;
        if (S.async) {
          if (S.busy) {
            if (S.nx === null) { st = 'W'; break; }
            const x = S.nx; S.nx = null; S.busy = false;
            if (!x.ok) throw x.error;
            r = x.value;
          } else {
            const p = S.it.next();
            S.busy = true;
            ap(then, P.resolve(p), [(x) => { S.nx = { ok: true, value: x }; }, (e) => { S.nx = { ok: false, error: e }; }]);
            continue;
          }
        } else {
          r = S.it.next();
        }
        if (r === null || typeof r !== 'object') throw new TypeErr('iterator result ' + r + ' is not an object');
        if (r.done) { st = 'D'; break; }
        push(r.value);
        if (now() - t0 >= BATCH_MS) break;
      }
    } catch (e) {
      st = 'F';
      if (S.oom(e)) tail = 'M{}';
      else if (e !== null && typeof e === 'object' && hasOwn(e, 'iso') && keys(e).length === 1) tail = e.iso[0] + e.iso[1];
      else { const f = C().failure({ ok: false, error: e }); tail = f[0] + f[1]; }
    }
    // Slow start: a batch that filled quickly may double; one cut short by time starts over,
    // so a generator that yields once and then computes for long delivers that value at once.
    batch = items.length >= want && now() - t0 < BATCH_MS ? Math.min(batch * 2, 4096) : 1;
    let out = st + '[';
    for (let i = 0; i < items.length; i++) out += (i ? ',' : '') + items[i];
    out += ']';
    return st === 'F' ? out + '\n' + tail : out;
  }
  function isoboxClose() {
    // Leaving the loop early: run the iterator's return() so `finally` blocks run.
    const it = S.it;
    S.it = null;
    if (it === null || it === undefined) return 'ok';
    const r = it.return;
    if (typeof r !== 'function') return 'ok';
    const x = ap(r, it, []);
    if (x instanceof P) { S.st = null; S.settle(x); return 'W'; }
    return 'ok';
  }

  // -- sessions ----------------------------------------------------------------------------
  function base() { S.base = new Set(Reflect.ownKeys(G)); return 'ok'; }
  function state() {
    // The session's own JSON-able globals (what a checkpoint keeps); others are skipped.
    const b = S.base, ks = keys(G);
    let out = '{', n = 0;
    for (let i = 0; i < ks.length; i++) {
      const k = ks[i];
      if (b.has(k)) continue;
      let v, t;
      try { v = G[k]; } catch (_) { continue; }
      if (typeof v === 'function' || typeof v === 'symbol') continue;
      try { t = hot.enc(v); } catch (_) { continue; }
      if (t === undefined) continue;
      out += (n++ ? ',' : '') + JS(k) + ':' + t;
      if (out.length > S.lim.result) return '';
    }
    return out + '}';
  }
  // REPL semantics: top-level `let`/`const` become `var` and `class X` becomes `var X = class X`,
  // so declarations persist on the session's global object and may be declared again. A small
  // scanner finds them: it skips strings, templates, comments and regular expressions, and
  // rewrites only at bracket depth 0.
  const ID = /[A-Za-z0-9_$\u0080-\uffff]/, WS = /\s/;
  const isId = (c) => c !== undefined && ap(RegExp.prototype.test, ID, [c]);
  const isWs = (c) => c !== undefined && ap(RegExp.prototype.test, WS, [c]);
  const REGEX_AFTER = new Set(['', 'return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void', 'throw', 'case', 'do', 'else', 'yield', 'await']);
  function repl(code) {
    // The next token's start after whitespace and comments.
    const skipBlank = (k) => {
      for (;;) {
        while (isWs(code[k])) k++;
        if (code[k] === '/' && code[k + 1] === '*') { const e = ap(indexOf, code, ['*/', k + 2]); if (e < 0) return code.length; k = e + 2; continue; }
        if (code[k] === '/' && code[k + 1] === '/') { while (k < code.length && code[k] !== '\n') k++; continue; }
        return k;
      }
    };
    if (ap(indexOf, code, ['let']) < 0 && ap(indexOf, code, ['const']) < 0 && ap(indexOf, code, ['class']) < 0) return code;
    const out = [], stack = [];
    let i = 0, last = '', lastKind = '', from = 0, nl = false, classAt = -1;
    const n = code.length;
    const emit = (upto, text) => { out[out.length] = ap(slice, code, [from, upto]); if (text) out[out.length] = text; from = upto; };
    while (i < n) {
      const c = code[i];
      if (c === '\n') { nl = true; i++; continue; }
      if (isWs(c)) { i++; continue; }
      if (c === '/' && code[i + 1] === '/') { while (i < n && code[i] !== '\n') i++; continue; }
      if (c === '/' && code[i + 1] === '*') { const e = ap(indexOf, code, ['*/', i + 2]); nl = true; i = e < 0 ? n : e + 2; continue; }
      if (c === '"' || c === "'") {
        i++;
        while (i < n && code[i] !== c && code[i] !== '\n') i += code[i] === '\\' ? 2 : 1;
        i++; last = 'str'; lastKind = 'v'; nl = false; continue;
      }
      if (c === '`' || (c === '}' && stack.length && stack[stack.length - 1] === '${')) {
        if (c === '}') stack.length--;
        i++;
        let opened = false;
        while (i < n && code[i] !== '`') {
          if (code[i] === '\\') { i += 2; continue; }
          if (code[i] === '$' && code[i + 1] === '{') { stack[stack.length] = '${'; i += 2; opened = true; break; }
          i++;
        }
        if (!opened && code[i] === '`') i++;  // the closing backtick (not one inside ${...})
        last = 'str'; lastKind = 'v'; nl = false; continue;
      }
      if (c === '/' && (lastKind === 'op' || REGEX_AFTER.has(last))) {
        i++;
        let cls = false;
        while (i < n && code[i] !== '\n') {
          const d = code[i];
          if (d === '\\') { i += 2; continue; }
          if (d === '[') cls = true; else if (d === ']') cls = false; else if (d === '/' && !cls) break;
          i++;
        }
        i++;
        while (isId(code[i])) i++;
        last = 'regex'; lastKind = 'v'; nl = false; continue;
      }
      if (isId(c)) {
        let j = i;
        while (isId(code[j])) j++;
        const word = ap(slice, code, [i, j]);
        const atStart = stack.length === 0 && (last === '' || last === ';' || last === '}' || (nl && lastKind !== 'op'));
        if (stack.length === 0 && (word === 'let' || word === 'const') && last !== '.') {
          const k = skipBlank(j);
          const inWord = ap(slice, code, [k, k + 2]) === 'in' && !isId(code[k + 2]);
          if (atStart && (isId(code[k]) || code[k] === '[' || code[k] === '{') && !inWord) emit(i, 'var'), from = j;
        } else if (word === 'class' && atStart) {
          const k = skipBlank(j);
          let e = k;
          while (isId(code[e])) e++;
          const name = ap(slice, code, [k, e]);
          if (name && name !== 'extends') { emit(i, 'var ' + name + ' = '); classAt = 0; }
        }
        last = word; lastKind = 'v'; nl = false; i = j; continue;
      }
      if (c === '(' || c === '[' || c === '{') {
        if (c === '{' && classAt === 0 && stack.length === 0) classAt = 1;
        stack[stack.length] = c;
      } else if (c === ')' || c === ']' || c === '}') {
        if (stack.length) stack.length--;
        if (c === '}' && classAt === 1 && stack.length === 0) { emit(i + 1, ';'); classAt = -1; }
      }
      last = c; lastKind = c === ')' || c === ']' || c === '}' ? 'v' : 'op'; nl = false; i++;
    }
    emit(n, '');
    return out.join('');
  }

  function op(name, a) {
    switch (name) {
      case '.poll': return poll();
      case '.fire': return isoboxFire();
      case '.settle': return isoboxSettle(a);
      case '.pump': return isoboxPump(a);
      case '.close': return isoboxClose();
      case '.state': return state();
      case '.base': return base();
      case '.repl': return repl(a);
      default: return '';
    }
  }
  const busy = () => timers.size > 0 || pend.size > 0 || outbox.length > 0;
  return { op, bind, reset, repl, streamStart, api, busy };
})
