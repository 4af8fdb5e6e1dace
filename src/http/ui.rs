//! `/ui`: a small live page that renders one JSON view as a table, whichever pipeline serves it. A view
//! that is an object is keyed by its member names; a view that is an array of objects is keyed by the
//! field `key_field` of each.

/// What `/ui` shows.
#[derive(Clone, Debug)]
pub struct Ui {
    /// The page's title.
    pub title: String,
    /// The view it polls (a path served by the same server).
    pub path: String,
    /// The heading of the first column: what the view is keyed by.
    pub key: String,
    /// For a view that is an array of objects: the field holding each row's key.
    pub key_field: Option<String>,
    /// A pipeline's own page instead of the table (static HTML that fetches its views itself).
    pub page: Option<&'static str>,
}

impl Ui {
    /// The page, with every value from the pipeline inserted as escaped text (HTML) or as a JSON literal
    /// (script), never as markup.
    pub(crate) fn page(&self) -> String {
        if let Some(page) = self.page {
            return page.to_owned();
        }
        let js = |s: &str| serde_json::to_string(s).expect("strings serialize");
        let title = self
            .title
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        TEMPLATE
            .replace("{{TITLE}}", &title)
            .replace("{{PATH}}", &js(&self.path))
            .replace("{{KEY}}", &js(&self.key))
            .replace("{{KEY_FIELD}}", &self.key_field.as_deref().map_or("null".into(), js))
    }
}

const TEMPLATE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tally · {{TITLE}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;min-width:40em}th,td{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left;font-family:monospace}#asof{color:#777}
</style></head><body>
<h1>{{TITLE}}</h1><p id="asof">loading…</p><table id="t"></table>
<script>
const PATH={{PATH}},KEY={{KEY}},KEY_FIELD={{KEY_FIELD}};
// With --auth-token-file, open /ui#token=<token>: the fragment never leaves the browser but in this header.
const TOKEN=new URLSearchParams(location.hash.slice(1)).get('token');
async function tick(){
  try{
    const r=await fetch(PATH,{headers:TOKEN?{Authorization:'Bearer '+TOKEN}:{}});
    if(r.status===503){document.getElementById('asof').textContent='catching up: '+(await r.json()).behind+' messages behind';return;}const asof=r.headers.get('X-Tally-As-Of');const data=await r.json();
    const rows=Array.isArray(data)?data.map(o=>[KEY_FIELD===null?'':(o[KEY_FIELD]??''),o]):Object.entries(data);
    const cols=rows.length?Object.keys(rows[0][1]).filter(c=>c!==KEY_FIELD):[];
    // Keys come from Kafka: cells get text, never markup, so a key like <img onerror=...> stays text.
    const row=(tag,cells)=>{const tr=document.createElement('tr');
      for(const c of cells){const e=document.createElement(tag);e.textContent=String(c);tr.appendChild(e);}return tr;};
    const t=document.getElementById('t');
    t.replaceChildren(row('th',[KEY,...cols]),...rows.map(([k,v])=>row('td',[k,...cols.map(c=>v[c])])));
    document.getElementById('asof').textContent='as of '+new Date(Number(asof)).toISOString()+' · '+rows.length+' rows';
  }catch(e){document.getElementById('asof').textContent='error: '+e;}
}
tick();setInterval(tick,1000);
</script></body></html>
"#;
