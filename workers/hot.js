// IsoBox trusted library, part 1: globals from the sandbox and the encoding of object results.
// Parsed on demand, possibly after user code ran: it uses the intrinsics the prelude captured
// (S) for its own control flow, and reads the rest at load time. A script that replaced
// built-ins can only break the conversion of its own result, inside its own budget.
(function (S) {
  'use strict';
  const { JS, ap, dp, G } = S;
  const isArr = Array.isArray, proto = Object.getPrototypeOf, OP = Object.prototype;
  const hasOwn = Object.hasOwn, keys = Object.keys, D = Date, getTime = D.prototype.getTime;
  const C = () => S.cold || (S.cold = S.lib(S.coldSrc)(S, H));
  class Tag { #b; constructor(t, v) { this.$isobox = t; this.v = v; } static is(o) { return #b in o; } }
  // Date.prototype.toJSON runs before a replacer sees the value: the one place to tell a Date
  // from a string. Installed for the encoding only; a script that froze it gets ISO strings.
  function dateToJSON() { return new Tag('date', ap(getTime, this, [])); }
  function rep(k, v) {
    const t = typeof v;
    if (t === 'string' || t === 'boolean' || (t === 'number' && v - v === 0)) return v;
    if (t === 'undefined') return null;
    if (t === 'object' && (v === null || isArr(v) || Tag.is(v) || (proto(v) === OP && !hasOwn(v, '$isobox')))) return v;
    return C().rep(v);
  }
  const every = Array.prototype.every, isFinite = Number.isFinite;
  function enc(v) {
    // Finite numbers, strings and booleans (most streamed values) and arrays of finite
    // numbers (most numeric transforms) need no replacer and no Date swap.
    const t = typeof v;
    if (t === 'string' || t === 'boolean' || (t === 'number' && v - v === 0)) return JS(v);
    if (isArr(v) && ap(every, v, [isFinite])) return JS(v);
    const desc = Object.getOwnPropertyDescriptor(D.prototype, 'toJSON');
    let swapped = false;
    try { dp(D.prototype, 'toJSON', { value: dateToJSON, writable: true, configurable: true }); swapped = true; } catch (_) { /* frozen */ }
    try { return JS(v, rep); } finally {
      if (swapped) { if (desc) dp(D.prototype, 'toJSON', desc); else delete D.prototype.toJSON; }
    }
  }
  function takeCon() { if (S.over) return '"overflow"'; if (!S.con.length) return '[]'; const o = JS(S.con); S.con = []; return o; }
  function kind(v) {
    return v === null ? 'null' : isArr(v) ? 'array' : typeof v !== 'object' ? typeof v
      : proto(v) === OP ? 'object' : C().kind(v);
  }
  function finish() {
    const cj = takeCon(), h = (k, p) => k + cj.length + ':' + cj + p;
    const st = S.st;
    if (st === null || !st.ok) { const r = C().failure(st); return h(r[0], r[1]); }
    const v = st.value;
    let t;
    try { t = enc(v); } catch (e) { const f = C().encodeFailure(e, v); return h(f[0], f[1]); }
    if (t === undefined) t = 'null';
    if (t.length > S.lim.result) return h('S', C().tooLarge(t.length));
    return h('R', kind(v) + '\n' + t);
  }
  function setup(cfg) {
    if (cfg.globals !== null) {
      const g = cfg.tagged ? C().revive(cfg.globals) : cfg.globals;
      for (const k of keys(g)) dp(G, k, { value: g[k], writable: true, configurable: true, enumerable: true });
    }
    if (cfg.env !== null) dp(G, 'process', { value: Object.freeze({ env: Object.freeze(cfg.env) }), configurable: true });
  }
  const H = () => api;
  function console() {
    const c = {};
    for (const k of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
      c[k] = (...a) => {
        if (S.mode === 'off' || S.over) return;
        let t = '';
        for (let i = 0; i < a.length; i++) t += (i ? ' ' : '') + (typeof a[i] === 'string' ? a[i] : C().fmt(a[i]));
        S.n += t.length + 16;
        if (S.n > S.lim.console) { S.over = true; S.con = []; } else S.con[S.con.length] = [k, t];
      };
    }
    c.dir = c.log;
    return c;
  }
  const api = {
    Tag, enc, finish, setup, takeCon, console,
    fmt: (v) => C().fmt(v),
    failed: (e, code) => C().failed(e, code),
    op(op, a) {
      if (op === 'fsdump') return S.memfs === null ? '{}' : S.memfs.dump();
      if (op === 'violations') {
        let out = '';
        for (let i = 0; i < S.violations.length; i++) out += (i ? ',' : '') + S.violations[i];
        return '[' + out + ']';
      }
      return op === 'console' ? takeCon() : C().op(op, a);
    },
    probe: (k) => C().probe(k),
    violation(type, details, severity) {
      const ks = S.keys(details);
      let d = '';
      for (let i = 0; i < ks.length; i++) d += (i ? ',' : '') + JS(ks[i]) + ':' + JS(details[ks[i]]);
      S.put(S.violations, '{"type":' + JS(type) + ',"severity":' + JS(severity || 'high') + ',"details":{' + d + '}}');
    },
    weak: () => C().weak(),
  };
  return api;
})
