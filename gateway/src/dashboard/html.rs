//! HTML building: every interpolated value goes through [`esc`] (or [`Html::text`]), the one
//! escaping helper; markup literals are the only unescaped text.

use std::fmt::Write as _;

use crate::tariff::calendar::SiteZone;

/// Text made safe for an HTML element body or a double-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page being written: markup through [`Html::raw`], values through [`Html::text`].
#[derive(Default)]
pub struct Html(String);

impl Html {
    pub fn raw(&mut self, markup: &str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.0.push_str(&esc(value));
        self
    }

    /// `<tag class="…">value</tag>` with the value escaped.
    pub fn el(&mut self, tag: &str, class: &str, value: &str) -> &mut Self {
        let _ = write!(self.0, "<{tag} class=\"{class}\">{}</{tag}>", esc(value));
        self
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Which navigation tab a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Overview,
    Meters,
    Payments,
}

/// The page shell: header with navigation and sign-out, the flash message, then `body`.
pub fn page(
    title: &str,
    tab: Option<Tab>,
    csrf: Option<&str>,
    flash: Option<&str>,
    body: &str,
) -> String {
    let mut h = Html::default();
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<title>")
        .text(title)
        .raw(" · Umeme gateway</title><link rel=\"stylesheet\" href=\"/dashboard/assets/app.css\">")
        .raw("<script src=\"/dashboard/assets/app.js\" defer></script></head><body>");
    h.raw("<header><a class=\"brand\" href=\"/dashboard\">⚡ Umeme</a>");
    if let Some(csrf) = csrf {
        h.raw("<nav>");
        for (t, href, label) in [
            (Tab::Overview, "/dashboard", "Overview"),
            (Tab::Meters, "/dashboard/meters", "Meters"),
            (Tab::Payments, "/dashboard/payments", "Payments"),
        ] {
            let cls = if tab == Some(t) { " class=\"on\"" } else { "" };
            h.raw(&format!("<a href=\"{href}\"{cls}>{label}</a>"));
        }
        h.raw("</nav><form method=\"post\" action=\"/dashboard/logout\" class=\"out\">")
            .raw("<input type=\"hidden\" name=\"csrf\" value=\"")
            .text(csrf)
            .raw("\"><button>Sign out</button></form><span id=\"live\" class=\"live\" title=\"live updates\"></span>");
    }
    h.raw("</header><main>");
    if let Some(f) = flash {
        h.raw("<p class=\"flash\" role=\"status\">")
            .text(f)
            .raw("</p>");
    }
    h.raw(body).raw("</main></body></html>");
    h.into_string()
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// KES from cents: `1,234.50`.
pub fn kes(cents: i64) -> String {
    let neg = cents < 0;
    let c = cents.unsigned_abs();
    let whole = (c / 100).to_string();
    let mut grouped = String::new();
    for (i, ch) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{}{grouped}.{:02}", if neg { "-" } else { "" }, c % 100)
}

/// Energy in kWh from Wh, three decimals at most.
pub fn kwh(wh: i64) -> String {
    let v = wh as f64 / 1000.0;
    if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Local date and time `YYYY-MM-DD HH:MM` in the site's zone.
pub fn local_time(zone: SiteZone, ms: i64) -> String {
    let shifted = ms.saturating_add(i64::from(zone.offset_minutes()) * 60_000);
    let iso = umeme_plugin_sdk::iso8601_utc(shifted);
    iso.get(..16).unwrap_or(&iso).replace('T', " ")
}

/// "3 min ago" style age.
pub fn ago(now: i64, at: i64) -> String {
    let s = ((now - at) / 1000).max(0);
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_markup_character_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }

    #[test]
    fn kes_groups_thousands_and_keeps_cents() {
        assert_eq!(kes(123_456_789), "1,234,567.89");
        assert_eq!(kes(-5), "-0.05");
        assert_eq!(kes(100_000), "1,000.00");
    }

    #[test]
    fn local_time_is_in_the_site_zone() {
        assert_eq!(local_time(SiteZone::NAIROBI, 0), "1970-01-01 03:00");
    }
}
