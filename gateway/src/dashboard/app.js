// Umeme dashboard: live updates (server-sent events) and the meter chart. No dependencies;
// the pages work without this file, only less live.
"use strict";

(function () {
  var dot = document.getElementById("live");

  // Replaces every live region ([data-live][id]) with the same region of a fresh copy of
  // this page, so the numbers change without a reload and forms being typed stay as they are.
  // One fetch at a time: a change during a fetch asks for one more afterwards, so an older
  // answer never lands after a newer one.
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    load().catch(function () {}).then(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }

  function load() {
    return fetch(location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.redirected && /\/login$/.test(r.url)) { location.href = r.url; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) el.replaceWith(document.importNode(fresh, true));
        });
        drawChart();
      });
  }

  if (dot && window.EventSource) {
    var es = new EventSource("/dashboard/live");
    es.addEventListener("hello", function () { dot.className = "live on"; dot.title = "live"; });
    es.addEventListener("change", function () { refresh(); });
    // A stream left open by a page being navigated away from would hold one of the browser's
    // few connections to this host.
    window.addEventListener("pagehide", function () { es.close(); });
    es.onerror = function () {
      dot.className = "live";
      dot.title = "reconnecting";
      // A stream ended by sign-out or expiry is not reopened by the browser: go to sign-in.
      if (es.readyState === EventSource.CLOSED) refresh();
    };
  }

  document.querySelectorAll("[data-confirm]").forEach(function (b) {
    b.addEventListener("click", function (e) {
      if (!confirm(b.getAttribute("data-confirm"))) e.preventDefault();
    });
  });

  // The meter chart: GET /api/meters/{id}/usage?from=&to=&step=hour|day answering
  // {"points":[{"at":ms,"wh":n}]}; "no data" when the endpoint is absent or empty.
  var step = "hour";
  var range = document.getElementById("range");
  if (range) {
    range.addEventListener("click", function (e) {
      var b = e.target.closest("button[data-step]");
      if (!b) return;
      step = b.getAttribute("data-step");
      range.querySelectorAll("button").forEach(function (x) { x.className = x === b ? "on" : ""; });
      drawChart();
    });
  }

  function svg(tag, attrs) {
    var el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    return el;
  }

  // Today and this month run from the site's midnight (data-day, data-month, data-month-end:
  // UTC ms from the server, on the daemon's clock), not the browser's, and labels are the
  // site's hours and dates (data-offset, minutes east of UTC): a phone in another zone, or
  // with a wrong clock, shows the same chart.
  function drawChart() {
    var box = document.getElementById("chart");
    if (!box) return;
    var from = Number(box.getAttribute(step === "hour" ? "data-day" : "data-month"));
    var to = step === "hour" ? from + 86400000 : Number(box.getAttribute("data-month-end"));
    var url = "/api/meters/" + encodeURIComponent(box.getAttribute("data-meter")) +
      "/usage?from=" + from + "&to=" + to + "&step=" + step;
    fetch(url, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { render(box, data && Array.isArray(data.points) ? data.points : []); })
      .catch(function () { render(box, []); });
  }

  // The same chart as the server draws (pages.rs bar_chart): bars in an SVG stretched to
  // the box, the scale and labels in HTML.
  function render(box, points) {
    box.textContent = "";
    var max = points.reduce(function (m, p) { return Math.max(m, Number(p.wh) || 0); }, 0);
    if (!points.length || max <= 0) {
      var p = document.createElement("p");
      p.className = "nodata";
      p.textContent = "no data";
      box.appendChild(p);
      return;
    }
    var chart = document.createElement("div");
    chart.className = "chart";
    var top = document.createElement("span");
    top.className = "ymax";
    top.textContent = (max / 1000).toFixed(2) + " kWh";
    chart.appendChild(top);
    var s = svg("svg", { viewBox: "0 0 " + points.length + " 100", preserveAspectRatio: "none", role: "img" });
    var xl = document.createElement("div");
    xl.className = "xl";
    var every = Math.max(1, Math.ceil(points.length / 8));
    points.forEach(function (p, i) {
      var offset = Number(box.getAttribute("data-offset")) || 0;
      var h = (Number(p.wh) || 0) / max * 100, d = new Date(p.at + offset * 60000);
      var label = step === "hour" ? d.getUTCHours() + ":00" : String(d.getUTCDate());
      var r = svg("rect", { x: i + 0.15, y: (100 - h).toFixed(2), width: 0.7, height: h.toFixed(2) });
      var t = svg("title", {});
      t.textContent = label + ": " + (p.wh / 1000).toFixed(3) + " kWh";
      r.appendChild(t);
      s.appendChild(r);
      var l = document.createElement("span");
      if (i % every === 0) l.textContent = label;
      xl.appendChild(l);
    });
    chart.appendChild(s);
    chart.appendChild(xl);
    box.appendChild(chart);
  }

  drawChart();
})();
