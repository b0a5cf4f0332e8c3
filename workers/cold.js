// IsoBox trusted library, part 2: the rare paths (errors, compile errors, top-level await,
// special values, tagged inputs, console formatting of objects, validation). Parsed only when a
// run needs it, possibly after user code ran: it takes the prelude's captured intrinsics from S
// and reads the rest at load time, so a script that replaced built-ins can only break the
// handling of its own run, inside its own budget.
(function (S, H) {
  'use strict';
  const hot = H();
  const K = { ap: S.ap, JS: S.JS, ev: S.ev, isView: ArrayBuffer.isView, hasOwn: Object.hasOwn,
    keys: Object.keys, entries: Object.entries, fromEntries: Object.fromEntries, isArr: Array.isArray,
    defProp: S.dp, Tag: hot.Tag, D: Date, AB: ArrayBuffer, U8: Uint8Array, b64: Uint8Array.prototype.toBase64,
    fromB64: Uint8Array.fromBase64, big: BigInt, bigStr: BigInt.prototype.toString, M: Map, S: Set,
    aFrom: Array.from, mapEntries: Map.prototype.entries, setValues: Set.prototype.values, Err: Error,
    SynErr: SyntaxError, TypeErr: TypeError, RangeErr: RangeError, Str: String, slice: String.prototype.slice,
    split: String.prototype.split, indexOf: String.prototype.indexOf, reExec: RegExp.prototype.exec,
    AsyncFn: (async function () {}).constructor, enc: hot.enc, charCode: String.prototype.charCodeAt,
    symKeyFor: Symbol.keyFor, filter: (a, f) => { const o = []; for (let i = 0; i < a.length; i++) if (f(a[i])) o[o.length] = a[i]; return o; } };
  const { ap, JS, isView, hasOwn, keys, entries, fromEntries, isArr, defProp, Tag, D, AB } = K;
  const T = '$isobox';
  const str = (s, m, a) => ap(K[m], s, a);
  const test = (re, s) => ap(K.reExec, re, [s]) !== null;
  class Unserializable { #b; constructor(what) { this.what = what; } static is(o) { return typeof o === 'object' && o !== null && #b in o; } }
  // Thrown values are untrusted: never instanceof (Proxy traps, Symbol.hasInstance); walk the
  // prototype chain with the captured getPrototypeOf, and treat any trap that throws as "no".
  function isA(e, C) {
    if (typeof e !== 'object' || e === null) return false;
    try {
      for (let p = S.gp(e), i = 0; p !== null && i < 64; p = S.gp(p), i++) if (p === C.prototype) return true;
    } catch (_) { /* a hostile trap: not one of ours */ }
    return false;
  }
  const safeGet = (o, k) => { try { return o[k]; } catch (_) { return undefined; } };
  function bytesOf(v) { return v instanceof AB ? new K.U8(v) : new K.U8(v.buffer, v.byteOffset, v.byteLength); }
  function rep(v) {
    // The prelude's replacer handles plain values; everything else comes here.
    switch (typeof v) {
      case 'number': return new Tag('num', v !== v ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity');
      // Hex, not decimal: Python converts decimal strings of over 4,300 digits only on request.
      case 'bigint': return new Tag('big', v < 0n ? '-0x' + ap(K.bigStr, -v, [16]) : '0x' + ap(K.bigStr, v, [16]));
      case 'object':
        if (isView(v) || v instanceof AB) return new Tag('bytes', ap(K.b64, bytesOf(v), []));
        if (v instanceof K.M) {
          const o = fromEntries(K.aFrom(ap(K.mapEntries, v, [])));
          return hasOwn(o, T) ? new Tag('obj', entries(o)) : o;
        }
        if (v instanceof K.S) return K.aFrom(ap(K.setValues, v, []));
        if (hasOwn(v, T)) return new Tag('obj', entries(v));
        return v;
      default: throw new Unserializable(typeof v);
    }
  }
  function kind(v) {
    if (v instanceof D) return 'date';
    if (isView(v) || v instanceof AB) return 'bytes';
    if (v instanceof K.M) return 'map';
    if (v instanceof K.S) return 'set';
    return 'object';
  }
  function describePath(root, name) {
    const stack = [];
    function walk(v, path) {
      const t = typeof v;
      if (t === 'function' || t === 'symbol') return path + ' is a ' + t;
      if (t !== 'object' || v === null) return null;
      for (let i = 0; i < stack.length; i++) if (stack[i] === v) return path + ' is a cyclic reference';
      if (isView(v) || v instanceof AB || v instanceof D) return null;
      stack[stack.length] = v;
      if (v instanceof K.M || v instanceof K.S) {
        // A Map crosses as an object (its keys as strings), a Set as an array.
        const isMap = v instanceof K.M, items = K.aFrom(ap(isMap ? K.mapEntries : K.setValues, v, []));
        for (let i = 0; i < items.length; i++) {
          const found = isMap ? walk(items[i][1], path + '.' + K.Str(items[i][0])) : walk(items[i], path + '[' + i + ']');
          if (found !== null) return found;
        }
        stack.length--;
        return null;
      }
      const ks = isArr(v) ? null : keys(v);
      const n = ks === null ? v.length : ks.length;
      for (let i = 0; i < n; i++) {
        const k = ks === null ? i : ks[i];
        const found = walk(v[k], ks === null ? path + '[' + i + ']' : path + '.' + k);
        if (found !== null) return found;
      }
      stack.length--;
      return null;
    }
    return walk(root, name || 'result') || (name || 'result') + ' cannot be serialized';
  }
  const getTime = D.prototype.getTime;
  function badDate(root, name) {
    // Python's datetime holds years 1 to 9999: from -62135596800000 to 253402300799999 ms.
    const seen = [];
    function walk(v, path) {
      if (typeof v !== 'object' || v === null) return null;
      if (v instanceof D) {
        const ms = ap(getTime, v, []);
        if (ms !== ms) return path + ' is an Invalid Date';
        return ms < -62135596800000 || ms > 253402300799999 ? path + " is a Date outside the host's range (years 1 to 9999)" : null;
      }
      for (let i = 0; i < seen.length; i++) if (seen[i] === v) return null;
      seen[seen.length] = v;
      if (isView(v) || v instanceof AB) return null;
      const ks = isArr(v) ? null : keys(v), n = ks === null ? v.length : ks.length;
      for (let i = 0; i < n; i++) {
        const found = ks === null ? walk(v[i], path + '[' + i + ']') : walk(v[ks[i]], path + '.' + ks[i]);
        if (found !== null) return found;
      }
      return null;
    }
    return walk(root, name);
  }
  function encodeFailure(e, v, name) {
    if (S.oom(e)) return ['M', '{}'];  // the conversion ran out of memory: the run did
    const msg = safeGet(e, 'message');
    if (Unserializable.is(e) || (isA(e, K.TypeErr) && typeof msg === 'string' && test(/circular/, msg))) {
      return ['S', JS({ message: clip(describePath(v, name), S.lim.error) })];
    }
    if (isA(e, K.RangeErr)) return ['S', JS({ message: 'result is too deeply nested to serialize' })];
    const r = record(e);
    r.message = 'while converting the result: ' + r.message;
    return ['E', JS(r)];
  }
  const tooLarge = (n) => JS({ message: 'result of ' + n + ' bytes exceeds the cap of ' + S.lim.result + ' bytes' });
  function clip(s, max) {
    s = typeof s === 'string' ? s : fmt(s);
    return s.length > max ? str(s, 'slice', [0, max]) + '... [truncated]' : s;
  }
  function fmt(v) {
    try {
      if (typeof v === 'string') return v;
      if (typeof v === 'symbol' || typeof v === 'function') return K.Str(v);
      if (typeof v === 'object' && v !== null && !isA(v, K.Err)) {
        const s = K.enc(v);
        if (typeof s === 'string') return s;
      }
      return K.Str(v);
    } catch (e) {
      return '[unprintable value]';
    }
  }
  function record(e) {
    let name = '', message, stack = '';
    if (isA(e, K.Err)) {
      try { name = typeof e.name === 'string' ? e.name : 'Error'; } catch (_) { name = 'Error'; }
      try { message = typeof e.message === 'string' ? e.message : fmt(e.message); } catch (_) { message = '[unprintable message]'; }
      try { stack = typeof e.stack === 'string' ? e.stack : ''; } catch (_) { stack = ''; }
    } else {
      message = fmt(e);
    }
    return { name: clip(name, 200), message: clip(message, S.lim.error), stack: clip(stack, S.lim.error) };
  }
  function compileRecord(e, colShift) {
    // A compile error's stack is a bare "at <input>:L:C", then "at eval (native)", then our entry.
    const r = record(e);
    const lines = str(r.stack, 'split', ['\n']);
    const m = ap(K.reExec, /^\s*at <input>:(\d+):(\d+)$/, [lines[0] || '']);
    if (m && lines.length >= 3 && str(lines[1], 'indexOf', ['at eval (native)']) >= 0
        && test(/at (dispatch|failed|validate) /, lines[2])) {
      r.compile = true;
      r.line = +m[1];
      r.column = r.line === 1 ? +m[2] - colShift : +m[2];
      r.stack = '    at <input>:' + r.line + ':' + r.column + '\n';
    }
    return r;
  }
  function completionSplit(code) {
    // Top-level await runs the code as an async function body whose last expression statement
    // becomes the return value. The earliest split "statements; expression" where both halves
    // parse is the right one; the engine is the parser, so strings and comments need no lexer.
    let body = code;
    while (body.length && test(/[\s;]$/, body)) body = str(body, 'slice', [0, body.length - 1]);
    let attempts = 0;
    for (let k = 0; k < body.length && attempts < 256; k++) {
      if (k > 0 && body[k - 1] !== ';' && body[k - 1] !== '\n') continue;
      const tail = str(body, 'slice', [k]);
      if (!test(/\S/, tail)) break;
      attempts++;
      try {
        new K.AsyncFn('return (' + tail + '\n)');
        const prefix = str(body, 'slice', [0, k]);
        new K.AsyncFn(prefix);
        return prefix + ';return (' + tail + '\n)';
      } catch (_) { /* not a split point */ }
    }
    return code;
  }
  const HEAD = '(async function isoboxAsync() {';
  function failed(e, code) {
    const settle = S.settle, set = (st) => { S.st = st; };
    // The first evaluation threw: a runtime error, a compile error, or top-level await.
    const r = compileRecord(e, 0);
    if (!r.compile || !isA(e, K.SynErr) || str(code, 'indexOf', ['await']) < 0) {
      set({ ok: false, error: e, record: r });
      return 'D';
    }
    let fn;
    try {
      fn = K.ev(S.src(HEAD + completionSplit(code) + '\n})'));
    } catch (e2) {
      set({ ok: false, error: e2, record: compileRecord(e2, HEAD.length) });
      return 'D';
    }
    return settle(fn());
  }
  function failure(st) {
    if (st === null) {
      return ['E', JS({ name: 'Error', message: "the script's promise never settled and nothing is left to run", stack: '' })];
    }
    const r = st.record || record(st.error);
    for (let i = 0; i < S.trapped.length; i++) if (S.trapped[i] === st.error) r.security = true;
    return [r.compile ? 'C' : 'E', JS(r)];
  }
  function reviveTag(o) {
    switch (o[T]) {
      case 'u': return undefined;
      case 'num': return o.v === 'NaN' ? NaN : o.v === 'Infinity' ? 1 / 0 : -1 / 0;
      case 'big': return typeof o.v === 'string' && o.v[0] === '-' ? -K.big(str(o.v, 'slice', [1])) : K.big(o.v);
      case 'date': return new D(o.v);
      case 'bytes': return K.fromB64(o.v);
      case 'obj': {
        const out = {};
        for (let i = 0; i < o.v.length; i++) {
          defProp(out, o.v[i][0], { value: revive(o.v[i][1]), writable: true, enumerable: true, configurable: true });
        }
        return out;
      }
      default: return o;
    }
  }
  function revive(v) {
    if (typeof v !== 'object' || v === null) return v;
    if (isArr(v)) { for (let i = 0; i < v.length; i++) v[i] = revive(v[i]); return v; }
    if (hasOwn(v, T)) return reviveTag(v);
    const ks = keys(v);
    for (let i = 0; i < ks.length; i++) v[ks[i]] = revive(v[ks[i]]);
    return v;
  }
  function validate(code) {
    // Parse without running: the prefix throws before any user statement executes.
    try {
      K.ev('throw 0;' + code);
    } catch (e) {
      if (!isA(e, K.SynErr)) return '';
      const r = compileRecord(e, 8);
      if (!r.compile) return '';
      if (str(code, 'indexOf', ['await']) < 0) return JS(r);
      try { K.ev(HEAD + code + '\n})'); return ''; } catch (e2) { return JS(compileRecord(e2, HEAD.length)); }
    }
    return '';
  }
  // A read of a Node global the run does not provide (prelude.js). The caller's frame gives
  // the line and the UTF-8 byte column of the identifier in one of the run's sources: after
  // `typeof` the read is a feature test (undefined, no violation); after `.` it is a property
  // read (undefined, a violation); a bare reference throws the ReferenceError the script expects.
  const IDENT = /[\w$]/, TYPEOF = /(^|[^\w$])typeof[\s(]*$/, DOT = /\.\s*$/;
  function position() {
    const E = S.Err;
    let lim = 10, st = '';
    try { lim = E.stackTraceLimit; E.stackTraceLimit = 16; } catch (_) { /* a frozen limit */ }
    try { st = new E().stack; } catch (_) { st = ''; }
    try { E.stackTraceLimit = lim; } catch (_) { /* as above */ }
    const lines = str(typeof st === 'string' ? st : '', 'split', ['\n']);
    for (let i = 0; i + 1 < lines.length; i++) {
      if (str(lines[i], 'indexOf', ['isoboxProbe']) < 0) continue;
      const m = ap(K.reExec, /<input>:(\d+):(\d+)\)?$/, [lines[i + 1]]);
      return m ? [+m[1], +m[2]] : [];  // [] for a native caller: Reflect.get and the like
    }
    return null;
  }
  function accessKind(k, pos) {
    if (pos === null) return 'bare';
    if (pos.length === 0) return 'other';
    for (let s = S.srcs.length - 1; s >= 0; s--) {
      const line = str(S.srcs[s], 'split', ['\n'])[pos[0] - 1];
      if (line === undefined) continue;
      let i = 0;
      for (let bytes = 0; i < line.length && bytes < pos[1] - 1; i++) {
        const c = ap(K.charCode, line, [i]);
        bytes += c < 0x80 ? 1 : c < 0x800 ? 2 : (c >= 0xd800 && c < 0xdc00) ? (i++, 4) : 3;
      }
      if (str(line, 'slice', [i, i + k.length]) !== k || test(IDENT, line[i + k.length] || '')) continue;
      const before = str(line, 'slice', [0, i]);
      return test(TYPEOF, before) ? 'typeof' : test(DOT, before) ? 'property' : 'bare';
    }
    return 'other';
  }
  function probe(k) {
    const how = accessKind(k, position());
    if (how === 'typeof') return undefined;
    S.violation('forbidden_global', { name: k, access: how === 'bare' ? 'reference' : 'property' },
      how === 'bare' ? 'high' : 'medium');
    if (how !== 'bare') return undefined;
    const e = new S.RefErr(k + ' is not defined');
    S.put(S.trapped, e);
    throw e;
  }
  let weakApi = null;
  function weak() {
    if (weakApi !== null) return weakApi;
    const holdable = (t) => (typeof t === 'object' && t !== null) || typeof t === 'function'
      || (typeof t === 'symbol' && K.symKeyFor(t) === undefined);
    class WeakRef {
      #target;
      constructor(target) {
        if (!holdable(target)) throw new K.TypeErr('WeakRef: invalid target');
        this.#target = target;
      }
      deref() { return this.#target; }
      get [Symbol.toStringTag]() { return 'WeakRef'; }
    }
    class FinalizationRegistry {
      #tokens = [];
      constructor(cleanup) {
        if (typeof cleanup !== 'function') throw new K.TypeErr('FinalizationRegistry: cleanup must be callable');
      }
      register(target, held, token) {
        if (!holdable(target)) throw new K.TypeErr('FinalizationRegistry.register: invalid target');
        if (target === held) throw new K.TypeErr('FinalizationRegistry.register: target and holdings must not be the same');
        if (token !== undefined) {
          if (!holdable(token)) throw new K.TypeErr('FinalizationRegistry.register: invalid unregister token');
          this.#tokens[this.#tokens.length] = token;
        }
      }
      unregister(token) {
        if (!holdable(token)) throw new K.TypeErr('FinalizationRegistry.unregister: invalid unregister token');
        const t = this.#tokens, n = t.length;
        this.#tokens = K.filter(t, (x) => x !== token);
        return this.#tokens.length !== n;
      }
      get [Symbol.toStringTag]() { return 'FinalizationRegistry'; }
    }
    weakApi = { WeakRef, FinalizationRegistry };
    return weakApi;
  }
  const op = (name, a) => (name === 'validate' ? validate(S.JP(a)) : '');
  return { op, validate, probe, weak, badDate, rep, kind, encodeFailure, tooLarge, fmt, failed, failure, revive, describe: describePath };
})
