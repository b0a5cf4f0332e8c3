// IsoBox trusted library, part 4: the module system (CommonJS `require` over a virtual file
// map), the `require` policy (whitelist, host-provided modules, mocks, denied built-ins) and a
// pure `path` module. Parsed only by runs that bring a project or a `require` option. Like the
// other libraries it keeps the prelude's captured intrinsics (S) for its own control flow.
(function (S, H) {
  'use strict';
  const { ap, JP, dp, G } = S;
  const hasOwn = Object.hasOwn, keys = Object.keys, freeze = Object.freeze, create = Object.create;
  const slice = String.prototype.slice, split = String.prototype.split, indexOf = String.prototype.indexOf;
  const lastIndexOf = String.prototype.lastIndexOf, startsWith = String.prototype.startsWith;
  const endsWith = String.prototype.endsWith, join = Array.prototype.join, Err = Error;
  const BUILTINS = new Set(['assert', 'async_hooks', 'buffer', 'child_process', 'cluster', 'console',
    'constants', 'crypto', 'dgram', 'diagnostics_channel', 'dns', 'domain', 'events', 'fs', 'http',
    'http2', 'https', 'inspector', 'module', 'net', 'os', 'path', 'perf_hooks', 'process',
    'punycode', 'querystring', 'readline', 'repl', 'stream', 'string_decoder', 'sys', 'timers',
    'tls', 'trace_events', 'tty', 'url', 'util', 'v8', 'vm', 'wasi', 'worker_threads', 'zlib']);
  const EXTS = ['', '.js', '.json', '.cjs', '.mjs', '.ts', '.tsx', '.mts', '.cts'];

  // -- paths (also the sandbox's `path` module: POSIX, pure) ----------------------------------
  function normalize(p) {
    const abs = ap(startsWith, p, ['/']);
    const out = [];
    const parts = ap(split, p, ['/']);
    for (let i = 0; i < parts.length; i++) {
      const s = parts[i];
      if (s === '' || s === '.') continue;
      if (s === '..') { if (out.length && out[out.length - 1] !== '..') out.length--; else if (!abs) out[out.length] = '..'; continue; }
      out[out.length] = s;
    }
    const body = ap(join, out, ['/']);
    return abs ? '/' + body : body || '.';
  }
  const dirname = (p) => { const i = ap(lastIndexOf, p, ['/']); return i <= 0 ? (i === 0 ? '/' : '.') : ap(slice, p, [0, i]); };
  const basename = (p, ext) => { let b = ap(slice, p, [ap(lastIndexOf, p, ['/']) + 1]); if (ext && ap(endsWith, b, [ext])) b = ap(slice, b, [0, b.length - ext.length]); return b; };
  const extname = (p) => { const b = basename(p); const i = ap(lastIndexOf, b, ['.']); return i <= 0 ? '' : ap(slice, b, [i]); };
  const pjoin = (...a) => normalize(ap(join, a, ['/']));
  const presolve = (...a) => { let r = ''; for (let i = a.length - 1; i >= 0 && !ap(startsWith, r, ['/']); i--) r = a[i] + (r ? '/' + r : ''); return normalize(ap(startsWith, r, ['/']) ? r : '/' + r); };
  const pathModule = freeze({ sep: '/', delimiter: ':', normalize, dirname, basename, extname, join: pjoin,
    resolve: presolve, isAbsolute: (p) => ap(startsWith, p, ['/']),
    relative: (from, to) => {
      const f = ap(split, presolve(from), ['/']), t = ap(split, presolve(to), ['/']);
      let i = 1;
      while (i < f.length && i < t.length && f[i] === t[i]) i++;
      const up = []; for (let j = i; j < f.length; j++) if (f[j]) up[up.length] = '..';
      return ap(join, [...up, ...ap(Array.prototype.slice, t, [i])], ['/']);
    } });

  // -- the policy ---------------------------------------------------------------------------
  let files = new Map(), policy = null, cache = new Map();
  const violation = (type, details) => S.violation(type, details);
  function isoboxModDenied(message) {
    const e = new Err(message);
    dp(e, 'name', { value: 'SecurityError', writable: true, configurable: true });
    return e;
  }
  function allowed(name) {
    const w = policy.whitelist;
    for (let i = 0; i < w.length; i++) {
      const p = w[i];
      if (p === name) return true;
      if (ap(endsWith, p, ['/*']) && ap(startsWith, name, [ap(slice, p, [0, p.length - 1])])) return true;
    }
    return false;
  }

  // -- modules ------------------------------------------------------------------------------
  function isoboxModFind(p) {
    for (let i = 0; i < EXTS.length; i++) if (files.has(p + EXTS[i])) return p + EXTS[i];
    const pkg = p + '/package.json';
    if (files.has(pkg)) {
      let main = null;
      try { main = JP(files.get(pkg)).main; } catch (_) { /* not JSON: no main */ }
      if (typeof main === 'string') { const f = isoboxModFind(normalize(p + '/' + main)); if (f !== null) return f; }
    }
    for (let i = 1; i < EXTS.length; i++) if (files.has(p + '/index' + EXTS[i])) return p + '/index' + EXTS[i];
    return null;
  }
  function isoboxModResolve(spec, fromDir) {
    if (typeof spec !== 'string' || spec === '') throw new TypeError('require: the module name must be a non-empty string');
    if (spec[0] === '/' || ap(startsWith, spec, ['./']) || ap(startsWith, spec, ['../']) || spec === '.' || spec === '..') {
      const f = isoboxModFind(normalize(spec[0] === '/' ? spec : fromDir + '/' + spec));
      if (f === null) throw isoboxModNotFound(spec, fromDir);
      return { file: f };
    }
    const name = ap(startsWith, spec, ['node:']) ? ap(slice, spec, [5]) : spec;
    const top = name[0] === '@' ? ap(join, ap(Array.prototype.slice, ap(split, name, ['/']), [0, 2]), ['/']) : ap(split, name, ['/'])[0];
    if (hasOwn(policy.mocks, name)) return { mock: name };
    if (name === 'path' && policy.path) return { builtin: 'path' };
    if (name === 'fs' && S.fsModule) return { builtin: 'fs' };
    if (BUILTINS.has(top) || !allowed(name) && !allowed(top)) {
      violation('unauthorized_require', { module: spec });
      throw isoboxModDenied("require of '" + spec + "' is not allowed" + (BUILTINS.has(top) ? ' (a Node built-in module)' : ' (not on the whitelist)'));
    }
    if (hasOwn(policy.modules, name)) return { file: '/node_modules/' + name + '/index.js', source: policy.modules[name] };
    const f = isoboxModFind('/node_modules/' + name);
    if (f === null) throw isoboxModNotFound(spec, fromDir);
    return { file: f };
  }
  function isoboxModNotFound(spec, fromDir) {
    const e = new Err("Cannot find module '" + spec + "' from '" + fromDir + "'");
    e.code = 'MODULE_NOT_FOUND';
    return e;
  }
  function makeRequire(fromDir) {
    const req = function isoboxModRequire(spec) { return isoboxModLoad(isoboxModResolve(spec, fromDir)).exports; };
    req.resolve = (spec) => { const r = isoboxModResolve(spec, fromDir); return r.file || r.mock || r.builtin; };
    req.cache = null;
    return req;
  }
  function isoboxModLoad(r) {
    if (r.builtin === 'path') return { exports: pathModule };
    if (r.builtin === 'fs') return { exports: S.fsModule() };
    if (r.mock !== undefined) {
      const key = 'mock:' + r.mock;
      if (cache.has(key)) return cache.get(key);
      const m = policy.mocks[r.mock];
      if (m.source !== undefined) return isoboxModRun(key, '/mocks/' + r.mock + '.js', m.source);
      const mod = { exports: m.value, loaded: true, id: key };
      cache.set(key, mod);
      return mod;
    }
    if (cache.has(r.file)) return cache.get(r.file);
    const source = r.source !== undefined ? r.source : files.get(r.file);
    if (ap(endsWith, r.file, ['.json'])) {
      const mod = { exports: undefined, loaded: false, id: r.file };
      cache.set(r.file, mod);
      try { mod.exports = JP(source); } catch (e) { cache.delete(r.file); throw new SyntaxError(r.file + ': ' + e.message); }
      mod.loaded = true;
      return mod;
    }
    return isoboxModRun(r.file, r.file, source);
  }
  // Each module is a method named by its path, so stack frames of its own code say which
  // file. All of a project's script files are compiled in one evaluation the first time one
  // is required (one parse instead of one per module); if that fails to parse, each module is
  // compiled on its own when required, so the syntax error belongs to the module that has it.
  const HEAD = '(exports, require, module, __filename, __dirname) {';
  let compiled = null;
  function compileAll() {
    compiled = new Map();
    let src = '({';
    const names = [];
    for (const [path, code] of files) {
      if (path === entryFile || ap(endsWith, path, ['.json'])) continue;
      src += S.JS(path) + HEAD + code + '\n},\n';
      names[names.length] = path;
    }
    let all;
    try { all = S.ev(S.src(src + '})')); } catch (_) { return; }
    for (let i = 0; i < names.length; i++) compiled.set(names[i], all[names[i]]);
  }
  function compileOne(file, source) {
    if (compiled === null && source === files.get(file)) compileAll();
    const fn = source === files.get(file) && compiled.get(file);
    if (fn) return fn;
    const name = S.JS(file);
    return S.ev(S.src('({' + name + HEAD + source + '\n}})[' + name + ']'));
  }
  function isoboxModRun(key, file, source) {
    // Node's semantics: the module is cached before it runs, so a circular require sees its
    // partial exports; a module that throws is removed again, so the error repeats.
    const mod = { exports: {}, loaded: false, id: file, filename: file, children: [] };
    cache.set(key, mod);
    try {
      ap(compileOne(file, source), mod.exports, [mod.exports, makeRequire(dirname(file)), mod, file, dirname(file)]);
    } catch (e) {
      cache.delete(key);
      throw e;
    }
    mod.loaded = true;
    return mod;
  }

  let entryFile = null;
  function setup(cfg) {
    // cfg.files: {path: source}; cfg.require: {whitelist, modules, mocks, path}
    files = new Map();
    cache = new Map();
    compiled = null;
    entryFile = cfg.project || null;
    const fs = cfg.files || {};
    const ks = keys(fs);
    for (let i = 0; i < ks.length; i++) files.set(ks[i], fs[ks[i]]);
    const rq = cfg.require || {};
    policy = { whitelist: rq.whitelist || [], modules: rq.modules || {}, mocks: rq.mocks || {},
      path: rq.path !== false };
  }
  function entry(file) {
    // The entrypoint runs as a script (so its completion value is the result), with the
    // CommonJS names defined for it; other modules run wrapped in functions.
    const mod = { exports: {}, loaded: false, id: '.', filename: file, children: [] };
    mod.initial = mod.exports;
    cache.set(file, mod);
    const names = { require: makeRequire(dirname(file)), module: mod, exports: mod.exports,
      __filename: file, __dirname: dirname(file) };
    const ks = keys(names);
    for (let i = 0; i < ks.length; i++) dp(G, ks[i], { value: names[ks[i]], writable: true, configurable: true });
    return mod;
  }
  function exportsOf(mod) {
    // An entrypoint without a completion value gives what it exported, if anything.
    const x = mod.exports;
    // An ES module (compiled to CommonJS) gives its default export.
    if (x !== null && typeof x === 'object' && x.__esModule === true) return x.default;
    if (x !== mod.initial) return x;
    return x !== null && typeof x === 'object' && keys(x).length ? x : undefined;
  }
  function globalRequire() {
    dp(G, 'require', { value: makeRequire('/'), writable: true, configurable: true });
  }
  return { setup, entry, exportsOf, globalRequire, pathModule, normalize, violation, securityError: isoboxModDenied };
})
