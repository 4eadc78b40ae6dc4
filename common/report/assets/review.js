/* review.html: confirm or re-label predict mode's calls (common/report/review.py inlines this file).
 *
 * Data: the JSON blob #review-data (its layout: common/report/review.py's docstring). State: the
 * validated label of each row, in localStorage under D.key (survives a reload). The list is
 * virtualised: only the rows in view, plus OVERSCAN on each side, exist in the DOM, so a page of
 * 20,000 images decodes a few dozen thumbnails at a time. No library, no network.
 */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("review-data").textContent);
  var UNKNOWN = "unknown";
  var N = D.items.length;
  var BOX = D.scale.box;
  var CAP_LINES = D.scale.pixel_size_um ? 3 : 2;  // under each image: name or class, size in px (and in µm)
  var ROW_H = BOX + 14 * CAP_LINES + 16;   // px: one row (box, captions, padding); every row the same
  var FIG_W = BOX + 30;        // px: one image's column (captions longer than this are cut with …)
  var OVERSCAN = 4;            // rows rendered beyond each edge of the view
  var DETAIL = Math.round(1.75 * BOX);  // px: the box of the image shown large in the side panel
  var MAX_UPSCALE = 8;         // the side panel enlarges a tiny image at most this much
  var labels = {};             // row index -> validated label (the work)
  var storageOk = true;

  // ------------------------------------------------------------------ small helpers
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }
  function num(x, nd) { return x === null || x === undefined ? "–" : x.toFixed(nd === undefined ? 3 : nd); }
  function base(p) { var m = /[^\/\\]*$/.exec(p); return m ? m[0] : p; }
  function item(i) {
    var a = D.items[i];
    return {i: i, sample: D.samples[a[0]], predicted: D.names[a[1]], sim: a[2], margin: a[3], knn: a[4],
            reasons: a[5], img: a[6], nbs: a[7].map(function (n) { return {img: n[0], label: D.names[n[1]], sim: n[2]}; })};
  }
  function reasonList(mask) {
    var out = [];
    for (var r = 0; r < D.reasons.length; r++) { if (mask & (1 << r)) { out.push(r); } }
    return out;
  }

  // ------------------------------------------------------------------ state in localStorage
  function load() {
    try {
      var raw = window.localStorage.getItem(D.key);
      var o = raw ? JSON.parse(raw) : null;
      if (o && o.labels && typeof o.labels === "object") { labels = o.labels; }
    } catch (e) { storageOk = false; }
  }
  function persist() {
    try {
      window.localStorage.setItem(D.key, JSON.stringify({labels: labels, saved: new Date().toISOString()}));
    } catch (e) { storageOk = false; }
    storageWarn.hidden = storageOk;
  }
  function nReviewed() {
    var n = 0;
    for (var k in labels) { if (Object.prototype.hasOwnProperty.call(labels, k) && +k < N) { n++; } }
    return n;
  }

  // ------------------------------------------------------------------ page skeleton
  var body = document.body;
  var header = el("header");
  header.appendChild(el("h1", "", D.title));
  header.appendChild(el("p", "note", D.note));
  var tools = el("div", "tools");
  function select(id, label, options) {
    var l = el("label", "", label + " "), s = el("select");
    s.id = id;
    options.forEach(function (o) { var opt = el("option", "", o[1]); opt.value = o[0]; s.appendChild(opt); });
    l.appendChild(s);
    tools.appendChild(l);
    return s;
  }
  var predicted = {};
  for (var i0 = 0; i0 < N; i0++) { predicted[D.names[D.items[i0][1]]] = true; }
  var fClass = select("f-class", "Predicted class", [["", "all"]].concat(
    Object.keys(predicted).sort().map(function (c) { return [c, c]; })));
  var fSample = select("f-sample", "Sample", [["", "all"]].concat(D.samples.map(function (s) { return [s, s]; })));
  var fDoubt = select("f-doubt", "Doubt", [["", "all"], ["doubtful", "doubtful"], ["sure", "not doubtful"]].concat(
    D.reasons.map(function (r, k) { return ["r" + k, r]; })));
  var fStatus = select("f-status", "Status", [["", "all"], ["todo", "to review"], ["done", "reviewed"]]);
  var scaleLabel = el("label");
  var fScale = el("input");
  fScale.type = "checkbox"; fScale.id = "f-scale"; fScale.checked = true;
  scaleLabel.appendChild(fScale);
  scaleLabel.appendChild(document.createTextNode(" one scale "));
  var legend = el("span", "legend");
  var legendBar = el("i");
  legendBar.style.width = (D.scale.bar_px * D.scale.per_px).toFixed(1) + "px";
  legend.appendChild(legendBar);
  legend.appendChild(document.createTextNode(" = " + D.scale.bar_label));
  scaleLabel.appendChild(legend);
  scaleLabel.title = "Every thumbnail at one scale, so sizes compare (a dashed frame: too large, shrunk to fit). " +
    "Untick to fill each box.";
  tools.appendChild(scaleLabel);
  var progress = el("span", "", "");
  progress.id = "progress";
  tools.appendChild(progress);
  var shown = el("span", "", "");
  shown.id = "shown";
  tools.appendChild(shown);
  var keysLine = el("div", "tools keys");
  keysLine.id = "keys";
  keysLine.appendChild(el("span", "", "Keys:"));
  [[["Enter", "c"], "confirm the call"], [["1", "5"], "neighbour n's class"], [["/"], "re-label (type, ↑↓, Enter)"],
   [["u"], "unknown"], [["x"], "clear"], [["j", "↓"], "next"], [["k", "↑"], "previous"],
   [["PgDn", "PgUp", "Home", "End"], "jump"]].forEach(function (kv) {
    var sp = el("span");
    kv[0].forEach(function (k, n) {
      if (n) { sp.appendChild(document.createTextNode(kv[0][0] === "1" ? "–" : " ")); }
      sp.appendChild(el("kbd", "", k));
    });
    sp.appendChild(document.createTextNode(" " + kv[1]));
    keysLine.appendChild(sp);
  });
  var saves = el("span", "saves");
  keysLine.appendChild(saves);
  var saveCsv = el("button", "primary", "Save corrections (CSV)");
  saveCsv.id = "save-csv";
  saveCsv.title = "corrections_" + D.name + ".csv: path, predicted, validated for every image of this " +
    "prediction (data.gallery_extra reads it)";
  saves.appendChild(saveCsv);
  var saveEco = null, ecoNote = null;
  if (D.ecotaxa) {
    saveEco = el("button", "", "Save for EcoTaxa (zip)");
    saveEco.id = "save-eco";
    saveEco.title = D.ecotaxa.zip + ": the reviewed images' rows of " + D.ecotaxa.bundle + ", status 'validated'. " +
      "Import it into the same EcoTaxa project with 'update classification' (Cla) and 'skip existing objects'.";
    saves.appendChild(saveEco);
    ecoNote = el("p", "note", "Save for EcoTaxa writes " + D.ecotaxa.zip + ": only the reviewed images (status " +
      "validated; unknown and unreviewed ones are left out). Import it into the same EcoTaxa project with " +
      "“update classification” (Cla) and “skip existing objects”; no images are needed.");
    ecoNote.id = "eco-note";
  }
  header.appendChild(tools);
  header.appendChild(keysLine);
  if (ecoNote) { header.appendChild(ecoNote); }
  var storageWarn = el("p", "warn", "This browser does not keep the work of this page (local storage is off or " +
    "full): save corrections before closing it.");
  storageWarn.id = "storage-warning";
  storageWarn.hidden = true;
  header.appendChild(storageWarn);
  body.appendChild(header);

  var main = el("main");
  var list = el("div");
  list.id = "list";
  list.tabIndex = 0;
  var spacer = el("div");
  spacer.id = "spacer";
  list.appendChild(spacer);
  main.appendChild(list);
  var panel = el("aside");
  panel.id = "panel";
  main.appendChild(panel);
  body.appendChild(main);

  // ------------------------------------------------------------------ thumbnails at one scale
  function fitScale(w, h, box, common) {
    var longest = Math.max(w, h, 1);
    if (common) { return Math.min(D.scale.per_px, box / longest); }
    return Math.min(MAX_UPSCALE, box / longest);
  }
  function sizeLines(fig, imgIndex) {  // "47 × 40 px · 94 × 80 µm" as one line each
    var im = D.images[imgIndex];
    (im && im[3] ? im[3].split(" · ") : []).forEach(function (t) { fig.appendChild(el("figcaption", "num", t)); });
  }
  function figure(imgIndex, box, common, alt) {
    var fig = el("figure");
    if (box === BOX) { fig.style.width = FIG_W + "px"; }  // a row's column; the panel's figure takes its width
    var im = D.images[imgIndex];
    var b = el("span", "box");
    b.style.width = box + "px"; b.style.height = box + "px";
    if (!im || !im[0]) {
      b.appendChild(el("span", "missing", "unreadable"));
    } else {
      var s = fitScale(im[1], im[2], box, common);
      var img = el("img");
      img.alt = alt; img.decoding = "async"; img.src = im[0];
      img.style.width = (im[1] * s).toFixed(1) + "px"; img.style.height = (im[2] * s).toFixed(1) + "px";
      // enlarged far beyond the stored thumbnail (tiny images): sharp pixels rather than a blur
      if (s / Math.min(1, BOX / Math.max(im[1], im[2], 1)) > 4) { img.style.imageRendering = "pixelated"; }
      b.appendChild(img);
      var bar = el("i", "bar");
      bar.style.width = (D.scale.bar_px * s).toFixed(1) + "px";
      b.appendChild(bar);
      if (common && s < D.scale.per_px * 0.999) {
        b.className += " shrunk";
        b.title = "shrunk to fit: not at the common scale (its bar is shorter)";
      }
    }
    fig.appendChild(b);
    return fig;
  }

  // ------------------------------------------------------------------ filters and the view
  var view = [];                    // item indices passing the filters, in page order
  var posOf = new Int32Array(N);    // item index -> position in view, -1 when filtered out
  var cur = -1;                     // the current item
  var detailImg = null;             // image shown large in the panel (null: the current query)
  function passes(i) {
    var a = D.items[i];
    if (fClass.value && D.names[a[1]] !== fClass.value) { return false; }
    if (fSample.value && D.samples[a[0]] !== fSample.value) { return false; }
    var d = fDoubt.value;
    if (d === "doubtful" && !a[5]) { return false; }
    if (d === "sure" && a[5]) { return false; }
    if (d.charAt(0) === "r" && !(a[5] & (1 << +d.slice(1)))) { return false; }
    var done = Object.prototype.hasOwnProperty.call(labels, i);
    if (fStatus.value === "todo" && done) { return false; }
    if (fStatus.value === "done" && !done) { return false; }
    return true;
  }
  function applyFilters() {
    view = [];
    posOf.fill(-1);
    for (var i = 0; i < N; i++) { if (passes(i)) { posOf[i] = view.length; view.push(i); } }
    spacer.style.height = (view.length * ROW_H) + "px";
    shown.textContent = view.length + " of " + N + " shown";
    clearRows();
    render();
  }

  // ------------------------------------------------------------------ the virtualised list
  var rendered = new Map();         // item index -> row element
  var pending = false;
  function clearRows() {
    rendered.forEach(function (r) { r.remove(); });
    rendered.clear();
  }
  function statusOf(i) {
    if (!Object.prototype.hasOwnProperty.call(labels, i)) { return null; }
    return labels[i];
  }
  function buildRow(i) {
    var it = item(i), lab = statusOf(i), common = fScale.checked;
    var row = el("div", "row");
    if (it.reasons) { row.className += " doubtful"; }
    if (it.reasons & 1) { row.className += " unknown"; }
    if (lab !== null) { row.className += " done"; }
    if (i === cur) { row.className += " current"; }
    row.style.height = ROW_H + "px";
    row.setAttribute("data-item", i);
    row.appendChild(el("div", "idx", "#" + (i + 1)));
    var q = figure(it.img, BOX, common, "query " + (i + 1));
    var path = D.rows[i][0];
    var cap = el("figcaption", "", base(path));
    cap.title = path;
    q.appendChild(cap);
    sizeLines(q, it.img);
    row.appendChild(q);
    var call = el("div", "call");
    call.appendChild(el("div", "pred", it.predicted));
    var nums = el("div");
    nums.appendChild(el("span", "num", "similarity " + num(it.sim)));
    nums.appendChild(document.createTextNode(" "));
    nums.appendChild(el("span", "num", "margin " + num(it.margin)));
    nums.appendChild(document.createTextNode(" "));
    nums.appendChild(el("span", "num", "k-th " + num(it.knn)));
    call.appendChild(nums);
    call.appendChild(el("div", "", "sample " + it.sample));
    var rs = reasonList(it.reasons);
    if (rs.length) {
      var rd = el("div");
      rs.forEach(function (r) { rd.appendChild(el("span", "reason r" + r, D.reasons[r])); });
      call.appendChild(rd);
    }
    var st;
    if (lab === null) { st = el("div", "status todo", "not reviewed"); }
    else if (lab === it.predicted) { st = el("div", "status", "✓ confirmed"); }
    else { st = el("div", "status changed", "→ " + lab); }
    call.appendChild(st);
    row.appendChild(call);
    var nbs = el("div", "nbs");
    it.nbs.forEach(function (n, j) {
      var f = figure(n.img, BOX, common, "neighbour " + (j + 1) + " " + n.label);
      f.className = "nb";
      f.setAttribute("data-nb", j);
      var c = el("figcaption", "nbcap");
      c.appendChild(el("span", "lab" + (n.label === it.predicted ? " same" : ""), (j + 1) + " " + n.label));
      c.appendChild(el("span", "num", num(n.sim)));
      c.title = n.label + ", similarity " + num(n.sim);
      f.appendChild(c);
      sizeLines(f, n.img);
      nbs.appendChild(f);
    });
    row.appendChild(nbs);
    return row;
  }
  function render() {
    pending = false;
    var top = list.scrollTop, h = list.clientHeight || 600;
    var a = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    var b = Math.min(view.length, Math.ceil((top + h) / ROW_H) + OVERSCAN);
    var want = new Set();
    for (var p = a; p < b; p++) { want.add(view[p]); }
    rendered.forEach(function (r, i) { if (!want.has(i)) { r.remove(); rendered.delete(i); } });
    for (var q = a; q < b; q++) {
      var i = view[q];
      if (!rendered.has(i)) {
        var r = buildRow(i);
        r.style.top = (q * ROW_H) + "px";
        spacer.appendChild(r);
        rendered.set(i, r);
      }
    }
  }
  function schedule() {
    if (!pending) { pending = true; window.requestAnimationFrame(render); }
  }
  function refreshRow(i) {
    var old = rendered.get(i);
    if (!old) { return; }
    var r = buildRow(i);
    r.style.top = old.style.top;
    old.replaceWith(r);
    rendered.set(i, r);
  }
  list.addEventListener("scroll", schedule);
  window.addEventListener("resize", schedule);
  list.addEventListener("click", function (e) {
    var row = e.target.closest(".row");
    if (!row) { return; }
    var nb = e.target.closest(".nb");
    setCurrent(+row.getAttribute("data-item"), false);
    if (nb) { detailImg = +nb.getAttribute("data-nb"); drawPanel(); }
  });

  // ------------------------------------------------------------------ the side panel
  var curHead = el("h2");
  var detail = el("div");
  detail.id = "detail";
  var curCall = el("div");
  curCall.id = "cur-call";
  var actions = el("div", "actions");
  function button(id, text, key, fn, cls) {
    var b = el("button", cls || "");
    b.id = id;
    b.appendChild(document.createTextNode(text + " "));
    b.appendChild(el("kbd", "", key));
    b.addEventListener("click", function () { fn(); b.blur(); });
    return b;
  }
  var bConfirm = button("b-confirm", "Confirm", "Enter", confirmCurrent, "primary");
  actions.appendChild(bConfirm);
  actions.appendChild(button("b-unknown", "Unknown", "u", function () { labelCurrent(UNKNOWN); }));
  actions.appendChild(button("b-clear", "Clear", "x", clearCurrent));
  var nbClasses = el("div");
  nbClasses.id = "nb-classes";
  var filterLabel = el("label", "", "Re-label: type to filter the classes ");
  filterLabel.appendChild(el("kbd", "", "/"));
  var filter = el("input");
  filter.id = "label-filter";
  filter.type = "text";
  filter.autocomplete = "off";
  filter.spellcheck = false;
  filter.placeholder = "class name…";
  filterLabel.htmlFor = "label-filter";
  var options = el("div");
  options.id = "label-options";
  options.setAttribute("role", "listbox");
  var keyNote = el("p", "note", "Labels are kept in this browser (local storage, key " + D.key + ") and survive " +
    "a reload. The saved files cover all " + D.rows.length + " images of this prediction.");
  [curHead, detail, curCall, actions, nbClasses, filterLabel, filter, options, keyNote].forEach(function (e) {
    panel.appendChild(e);
  });

  function drawPanel() {
    detail.textContent = "";
    curCall.textContent = "";
    nbClasses.textContent = "";
    if (cur < 0) {
      curHead.textContent = N ? "No image matches the filters" : "No image to review";
      bConfirm.disabled = true;
      return;
    }
    bConfirm.disabled = false;
    var it = item(cur);
    curHead.textContent = "Image #" + (cur + 1) + " (" + (posOf[cur] + 1) + " of " + view.length + " shown)";
    var imgIndex = detailImg === null ? it.img : it.nbs[detailImg].img;
    var im = D.images[imgIndex];
    var f = figure(imgIndex, DETAIL, false, "selected image");
    var what = detailImg === null ? "query " + base(D.rows[cur][0])
      : "neighbour " + (detailImg + 1) + ": " + it.nbs[detailImg].label + ", similarity " + num(it.nbs[detailImg].sim);
    f.appendChild(el("figcaption", "", what));
    if (im && im[0]) {
      var s = fitScale(im[1], im[2], DETAIL, false);
      sizeLines(f, imgIndex);
      f.appendChild(el("figcaption", "", "red bar " + D.scale.bar_label + (s > 1 ? " · enlarged " : " · shrunk ") +
        (s > 1 ? s : 1 / s).toFixed(1) + "×"));
    }
    detail.appendChild(f);
    var lab = statusOf(cur);
    curCall.appendChild(el("div", "", "Predicted: "));
    curCall.firstChild.appendChild(el("b", "", it.predicted));
    curCall.appendChild(el("div", lab === null ? "status todo" : (lab === it.predicted ? "status" : "status changed"),
      lab === null ? "not reviewed" : (lab === it.predicted ? "✓ confirmed" : "validated as " + lab)));
    bConfirm.firstChild.textContent = "Confirm " + it.predicted + " ";
    it.nbs.forEach(function (n, j) {
      nbClasses.appendChild(button("b-nb" + (j + 1), n.label, String(j + 1),
        function () { labelCurrent(n.label); }));
    });
  }

  // ------------------------------------------------------------------ the class list (type to filter)
  var allLabels = [UNKNOWN].concat(D.classes.slice().sort(function (a, b) {
    return a.toLowerCase() < b.toLowerCase() ? -1 : a.toLowerCase() > b.toLowerCase() ? 1 : 0;
  }));
  var matches = [], hi = 0;
  function drawOptions() {
    var q = filter.value.trim(), ql = q.toLowerCase();
    var first = [], rest = [];
    allLabels.forEach(function (c) {
      var cl = c.toLowerCase(), at = cl.indexOf(ql);
      if (at === 0) { first.push(c); } else if (at > 0) { rest.push(c); }
    });
    matches = first.concat(rest).map(function (c) { return {label: c, isNew: false}; });
    var exact = allLabels.some(function (c) { return c.toLowerCase() === ql; });
    if (q && !exact) { matches.push({label: q, isNew: true}); }
    if (hi >= matches.length) { hi = Math.max(0, matches.length - 1); }
    options.textContent = "";
    matches.forEach(function (m, n) {
      var o = el("div", (n === hi ? "hi" : "") + (m.isNew ? " new" : ""), m.isNew ? "new class “" + m.label + "”" : m.label);
      o.setAttribute("role", "option");
      o.setAttribute("data-label", m.label);
      o.addEventListener("mousedown", function (e) { e.preventDefault(); pick(m.label); });
      options.appendChild(o);
    });
    var h = options.children[hi];
    if (h && h.scrollIntoView) { h.scrollIntoView({block: "nearest"}); }
  }
  function pick(label) {
    filter.value = "";
    hi = 0;
    drawOptions();
    filter.blur();
    labelCurrent(label);
  }
  filter.addEventListener("input", function () { hi = 0; drawOptions(); });
  filter.addEventListener("keydown", function (e) {
    if (e.key === "ArrowDown") { hi = Math.min(matches.length - 1, hi + 1); drawOptions(); e.preventDefault(); }
    else if (e.key === "ArrowUp") { hi = Math.max(0, hi - 1); drawOptions(); e.preventDefault(); }
    else if (e.key === "Enter") { if (matches[hi]) { pick(matches[hi].label); } e.preventDefault(); }
    else if (e.key === "Escape") { filter.value = ""; hi = 0; drawOptions(); filter.blur(); e.preventDefault(); }
  });

  // ------------------------------------------------------------------ moving and labelling
  function scrollToCurrent() {
    var p = posOf[cur];
    if (p < 0) { return; }
    var top = p * ROW_H, h = list.clientHeight;
    if (top < list.scrollTop) { list.scrollTop = top; }
    else if (top + ROW_H > list.scrollTop + h) { list.scrollTop = top + ROW_H - h; }
    render();
  }
  function setCurrent(i, scroll) {
    var old = cur;
    cur = i;
    detailImg = null;
    if (old >= 0) { refreshRow(old); }
    if (cur >= 0) { refreshRow(cur); if (scroll !== false) { scrollToCurrent(); } }
    drawPanel();
  }
  function move(delta) {
    if (!view.length) { return; }
    var p = cur >= 0 && posOf[cur] >= 0 ? posOf[cur] : (delta > 0 ? -1 : view.length);
    setCurrent(view[Math.max(0, Math.min(view.length - 1, p + delta))]);
  }
  function afterChange(i, advance) {
    persist();
    updateProgress();
    var p = posOf[i];
    if (fStatus.value) {           // the label may move the image out of the view
      applyFilters();
      if (posOf[i] >= 0) { p = posOf[i] + (advance ? 1 : 0); }
      setCurrent(view.length ? view[Math.min(p, view.length - 1)] : -1);
      return;
    }
    refreshRow(i);
    if (advance && p + 1 < view.length) { setCurrent(view[p + 1]); } else { drawPanel(); }
  }
  function labelCurrent(label) {
    if (cur < 0) { return; }
    label = String(label).replace(/[\t\r\n]+/g, " ").trim();
    if (!label) { return; }
    labels[cur] = label;
    afterChange(cur, true);
  }
  function confirmCurrent() { if (cur >= 0) { labelCurrent(item(cur).predicted); } }
  function clearCurrent() {
    if (cur < 0) { return; }
    delete labels[cur];
    afterChange(cur, false);
  }
  function updateProgress() { progress.textContent = nReviewed() + " of " + N + " reviewed"; }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.target === filter) { return; }
    var tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") {
      if (e.key === "Escape") { e.target.blur(); }
      return;
    }
    if (tag === "BUTTON" && (e.key === "Enter" || e.key === " ")) { return; }  // the button's own click
    var k = e.key, page = Math.max(1, Math.floor(list.clientHeight / ROW_H));
    if (k === "j" || k === "ArrowDown") { move(1); }
    else if (k === "k" || k === "ArrowUp") { move(-1); }
    else if (k === "PageDown") { move(page); }
    else if (k === "PageUp") { move(-page); }
    else if (k === "Home") { move(-N); }
    else if (k === "End") { move(N); }
    else if (k === "Enter" || k === "c") { confirmCurrent(); }
    else if (k === "u") { labelCurrent(UNKNOWN); }
    else if (k === "x" || k === "Delete" || k === "Backspace") { clearCurrent(); }
    else if (k >= "1" && k <= "9" && k.length === 1) {
      var n = cur >= 0 ? item(cur).nbs[+k - 1] : null;
      if (n) { labelCurrent(n.label); }
    }
    else if (k === "/" || k === "l") { filter.focus(); drawOptions(); }
    else { return; }
    e.preventDefault();
  });

  // ------------------------------------------------------------------ saving
  function download(name, content, mime) {  // content: a string or a Uint8Array
    var url = URL.createObjectURL(new Blob([content], {type: mime}));
    var a = el("a");
    a.href = url; a.download = name; a.style.display = "none";
    body.appendChild(a);
    a.click();
    window.setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 5000);
  }
  function csvCell(v) {  // as Python's csv module writes it (QUOTE_MINIMAL)
    v = String(v);
    return /[",\r\n]/.test(v) ? "\"" + v.replace(/"/g, "\"\"") + "\"" : v;
  }
  function correctionsCsv() {
    var out = ["path,predicted,validated"];
    for (var r = 0; r < D.rows.length; r++) {
      out.push([D.rows[r][0], D.rows[r][1], Object.prototype.hasOwnProperty.call(labels, r) ? labels[r] : ""]
        .map(csvCell).join(","));
    }
    return out.join("\r\n") + "\r\n";
  }
  // ------------------------------------------------------------------ the EcoTaxa zip
  // ecotaxa_<name>_reviewed.zip: the predict bundle's own TSV rows (D.ecotaxa, read back from
  // ecotaxa_<name>.zip) of the reviewed images only, status "validated", the class mapped through
  // the taxa map as common/ecotaxa/bundle.py's _row maps a prediction. EcoTaxa imports it in update
  // mode Cla with "skip existing objects" (docs/ecotaxa.md): objects are found by object_id.
  var CRC_TABLE = (function () {
    var t = new Uint32Array(256);
    for (var n = 0; n < 256; n++) {
      var c = n;
      for (var k = 0; k < 8; k++) { c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1; }
      t[n] = c >>> 0;
    }
    return t;
  })();
  function crc32(bytes) {
    var c = 0xFFFFFFFF;
    for (var i = 0; i < bytes.length; i++) { c = CRC_TABLE[(c ^ bytes[i]) & 0xFF] ^ (c >>> 8); }
    return (c ^ 0xFFFFFFFF) >>> 0;
  }
  // One stored (uncompressed) entry: local header, data, central directory, end record. Names are
  // UTF-8 (flag bit 11); the date is 1980-01-01 00:00 and the mode rw-r--r--, as bundle.py's _member.
  function zipOne(name, data) {
    var enc = new TextEncoder(), fname = enc.encode(name), crc = crc32(data);
    var DOS_DATE = (0 << 9) | (1 << 5) | 1, UTF8 = 0x0800;
    var local = 30 + fname.length, central = 46 + fname.length;
    var out = new Uint8Array(local + data.length + central + 22), v = new DataView(out.buffer), p = 0;
    function u16(x) { v.setUint16(p, x, true); p += 2; }
    function u32(x) { v.setUint32(p, x >>> 0, true); p += 4; }
    u32(0x04034B50); u16(20); u16(UTF8); u16(0); u16(0); u16(DOS_DATE);
    u32(crc); u32(data.length); u32(data.length); u16(fname.length); u16(0);
    out.set(fname, p); p += fname.length;
    out.set(data, p); p += data.length;
    var cdStart = p;
    u32(0x02014B50); u16((3 << 8) | 20); u16(20); u16(UTF8); u16(0); u16(0); u16(DOS_DATE);
    u32(crc); u32(data.length); u32(data.length); u16(fname.length); u16(0); u16(0);
    u16(0); u16(0); u32(0x1A4 << 16); u32(0);
    out.set(fname, p); p += fname.length;
    var cdSize = p - cdStart;
    u32(0x06054B50); u16(0); u16(0); u16(1); u16(1); u32(cdSize); u32(cdStart); u16(0);
    return out;
  }
  // A TSV cell as bundle.py writes it: clean_text (each run of control characters -> one space;
  // a lone surrogate becomes U+FFFD in TextEncoder, as in clean_text), then Python's csv writer
  // (tab-separated, QUOTE_MINIMAL: after cleaning only '"' needs quoting, doubled inside quotes).
  function tsvCell(v) {
    v = String(v).replace(/[\x00-\x1f\x7f]+/g, " ");
    return v.indexOf("\"") >= 0 ? "\"" + v.replace(/"/g, "\"\"") + "\"" : v;
  }
  function normLabel(s) { return String(s).replace(/[\t\r\n]+/g, " ").trim(); }  // as labelCurrent stores it
  var taxaOf = null;  // class -> display name (string) or taxon id (number); a stored label finds its class too
  if (D.ecotaxa && D.ecotaxa.taxa) {
    taxaOf = new Map();
    Object.keys(D.ecotaxa.taxa).forEach(function (c) { taxaOf.set(c, D.ecotaxa.taxa[c]); });
    Object.keys(D.ecotaxa.taxa).forEach(function (c) {
      if (!taxaOf.has(normLabel(c))) { taxaOf.set(normLabel(c), D.ecotaxa.taxa[c]); }
    });
  }
  function ecoCell(col, k) { return Array.isArray(col) ? col[k] : col.d[col.i[k]]; }
  // What the button would write now: the reviewed rows and, per reason, those left out.
  function ecotaxaRows() {
    var E = D.ecotaxa, H = E.header;
    var cat = H.indexOf("object_annotation_category"), cid = H.indexOf("object_annotation_category_id");
    var st = H.indexOf("object_annotation_status");
    var rows = [], unknown = 0, missing = {}, nMissing = 0;
    for (var i = 0; i < N; i++) {
      if (!Object.prototype.hasOwnProperty.call(labels, i)) { continue; }  // unreviewed: never written
      var lab = labels[i], k = E.row[i];
      if (k < 0) {
        var why = E.why[-1 - k];
        missing[why] = (missing[why] || 0) + 1;
        nMissing++;
        continue;
      }
      if (lab === UNKNOWN) { unknown++; continue; }
      var row = E.columns.map(function (col) { return ecoCell(col, k); });
      var taxon = taxaOf && taxaOf.has(lab) ? taxaOf.get(lab) : null;
      row[cat] = typeof taxon === "string" ? taxon : lab;  // an id keeps the class name: EcoTaxa reads it first
      if (cid >= 0) { row[cid] = typeof taxon === "number" ? String(taxon) : ""; }
      row[st] = "validated";
      rows.push(row);
    }
    return {rows: rows, unknown: unknown, missing: missing, nMissing: nMissing};
  }
  function saveEcotaxa() {
    var E = D.ecotaxa, got = ecotaxaRows(), parts = [];
    if (got.unknown) {
      parts.push(got.unknown + " reviewed as unknown (EcoTaxa has no class “unknown”, and an empty category " +
        "corrects nothing in update mode)");
    }
    if (got.nMissing) {
      parts.push(got.nMissing + " not in " + E.bundle + ", left out when it was written (" +
        Object.keys(got.missing).slice(0, 3).map(function (w) { return got.missing[w] + ": " + w; }).join("; ") +
        (Object.keys(got.missing).length > 3 ? "; …" : "") + ")");
    }
    var left = parts.length ? " Left out: " + parts.join("; ") + "." : "";
    if (!got.rows.length) {
      ecoStatus(nReviewed() ? "Nothing saved for EcoTaxa: none of the " + nReviewed() + " reviewed images can go " +
        "back." + left : "Nothing saved for EcoTaxa: no image is reviewed yet.");
      return;
    }
    var lines = [E.header.map(tsvCell).join("\t"), E.types.map(tsvCell).join("\t")];
    got.rows.forEach(function (r) { lines.push(r.map(tsvCell).join("\t")); });
    var tsv = new TextEncoder().encode("\ufeff" + lines.join("\n") + "\n");  // UTF-8 with a BOM, as the bundle
    download(E.zip, zipOne(E.tsv, tsv), "application/zip");
    ecoStatus("Saved " + E.zip + ": " + got.rows.length + " reviewed image" + (got.rows.length === 1 ? "" : "s") +
      ", status validated." + left);
  }
  var ecoStatusEl = null;
  function ecoStatus(text) {
    if (!ecoStatusEl) {
      ecoStatusEl = el("p", "note");
      ecoStatusEl.id = "eco-status";
      ecoStatusEl.setAttribute("role", "status");
      (ecoNote || header).insertAdjacentElement("afterend", ecoStatusEl);
    }
    ecoStatusEl.textContent = text;
  }
  saveCsv.addEventListener("click", function () {
    download("corrections_" + D.name + ".csv", correctionsCsv(), "text/csv");
    saveCsv.blur();
  });
  if (saveEco) { saveEco.addEventListener("click", function () { saveEcotaxa(); saveEco.blur(); }); }
  [fClass, fSample, fDoubt, fStatus].forEach(function (s) {
    s.addEventListener("change", function () {
      applyFilters();
      setCurrent(posOf[cur] >= 0 ? cur : (view.length ? view[0] : -1));
      s.blur();  // the shortcuts work again at once
    });
  });
  fScale.addEventListener("change", function () { clearRows(); render(); drawPanel(); });

  // ------------------------------------------------------------------ start
  load();
  storageWarn.hidden = storageOk;
  // a link may preset the filters: review.html#class=NAME&sample=NAME&doubtful=1&status=todo
  function fromHash() {
    fClass.value = fSample.value = fDoubt.value = fStatus.value = "";
    window.location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var p = kv.split("="), v = decodeURIComponent(p[1] || "");
      if (p[0] === "class") { fClass.value = v; }
      else if (p[0] === "sample") { fSample.value = v; }
      else if (p[0] === "doubtful" && v === "1") { fDoubt.value = "doubtful"; }
      else if (p[0] === "status") { fStatus.value = v; }
    });
    applyFilters();
    setCurrent(view.length ? view[0] : -1);
  }
  window.addEventListener("hashchange", fromHash);
  if (!N) { list.appendChild(el("p", "", "No image to review.")).id = "empty"; }
  updateProgress();
  drawOptions();
  fromHash();
})();
