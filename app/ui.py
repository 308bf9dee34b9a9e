"""Page layout and event wiring only; every callback is a method of app.handlers.Handlers."""
from __future__ import annotations

import gradio as gr

from app import views
from app.handlers import AHN_MISSING_INFO, Handlers
from app.services.sessions import Session

# A per-tab id kept in sessionStorage: it survives a reload of the tab but is not shared with other tabs.
TAB_ID_JS = """
(tab) => {
  const key = "ahn-longdoc-tab-id";
  let id = window.sessionStorage.getItem(key);
  if (!id) {
    id = (window.crypto && window.crypto.randomUUID) ? window.crypto.randomUUID()
         : (Date.now().toString(36) + Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2));
    window.sessionStorage.setItem(key, id);
  }
  return [id];
}
"""
FILE_TYPES = [".pdf", ".txt", ".md", ".markdown"]


def theme() -> gr.themes.Base:
    # system fonts only: the page must not fetch anything from the internet
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def build_ui(h: Handlers) -> gr.Blocks:
    header_html, _, _, _, models_md_text, model_key_value = h.model_view()
    modes = h.engine.modes()
    private = {"api_visibility": "private"}
    with gr.Blocks(title="Long-document chat (AHN)", analytics_enabled=False) as demo:
        # The tab's session: set by `restore` at page load, nothing else writes it. It must not have a callable
        # default: Gradio runs such a default as a load event of its own, racing `restore` (whichever ends last
        # wins), and could leave the tab on a fresh unsaved session that a reload does not bring back.
        session = gr.State(None)
        # API clients (gradio_client) run no load event: each connection gets a fresh session of its own
        api_session = gr.State(Session)  # (a Session deep-copies as itself)
        tab_id = gr.Textbox(visible=False)
        # the key of the model this tab shows: a switch made in another tab is picked up by the timer
        model_key = gr.State(model_key_value)
        header = gr.HTML(header_html, elem_id="model-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=280):
                model_dd = gr.Dropdown(h.model_choices(), value=h.s.models.loaded_id, label="Model", elem_id="model",
                                       info="Loaded for all tabs, one model at a time (details under Models).")
                load_btn = gr.Button("Load model", size="sm", elem_id="load-model")
                model_status = gr.HTML("", elem_id="model-status")
                files = gr.File(label="Add documents (PDF, .txt, .md)", file_count="multiple",
                                file_types=FILE_TYPES, elem_id="upload")
                with gr.Row(visible=False, elem_id="password-row") as pw_row:
                    pw = gr.Textbox(label="PDF password", type="password", scale=3, elem_id="password")
                    unlock_btn = gr.Button("Unlock", scale=1, elem_id="unlock")
                status = gr.HTML(views.status_html([]), elem_id="status")
                docs = gr.HTML(views.documents_html(None, None), elem_id="documents-panel")
                clear_docs_btn = gr.Button("Remove all documents", size="sm", elem_id="clear-docs")
            with gr.Column(scale=7, min_width=360):
                mode = gr.Radio(h.mode_choices(), value=h.default_mode, label="Mode", elem_id="mode",
                                info=None if "ahn" in modes else AHN_MISSING_INFO)
                chatbot = gr.Chatbot(label="Chat", height=470, elem_id="chat", buttons=["copy"],
                                     placeholder="Add documents, then ask a question. Answers cite pages like "
                                                 "[Page 3].")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about your documents…", show_label=False, scale=8,
                                          lines=1, max_lines=6, elem_id="question", submit_btn=False)
                    send_btn = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                with gr.Row():
                    regen_btn = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate")
                    clear_btn = gr.Button("Clear chat", size="sm", elem_id="clear-chat")
                    compare_btn = gr.Button("Compare AHN vs full", size="sm", elem_id="compare-btn",
                                            interactive="ahn" in modes)
                    export_md_btn = gr.Button("Export .md", size="sm", elem_id="export-md")
                    export_json_btn = gr.Button("Export .json", size="sm", elem_id="export-json")
                export_file = gr.File(label="Exported chat", visible=False, elem_id="export-file")
                cmp = gr.HTML("", elem_id="compare-panel")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(8, 4096, value=h.chat.default_max_new_tokens, step=8,
                                        label="Max answer tokens", elem_id="max-new")
                    temperature = gr.Slider(0, 1.5, value=0, step=0.05, label="Temperature (0 = greedy)")
                with gr.Accordion("Models", open=False):
                    models_md = gr.Markdown(models_md_text, elem_id="models-table")
            with gr.Column(scale=4, min_width=280):
                memory = gr.HTML(h.memory(None), elem_id="memory-panel")
        timer = gr.Timer(1.0, active=False)  # started by `restore`, once the tab's session is known

        # hidden components of the scripting API (gradio_client): /upload, /ask, /memory, /stop, /compare, /info,
        # /load_model
        with gr.Group(visible=False):
            api_files = gr.File(file_count="multiple", label="files")
            api_password = gr.Textbox(value="", label="password")
            api_question = gr.Textbox(label="question")
            api_mode = gr.Textbox(value=h.default_mode, label="mode")
            api_max_new = gr.Number(value=h.chat.default_max_new_tokens, precision=0, label="max_new_tokens")
            api_preset = gr.Textbox(label="preset")
            api_json = gr.JSON(label="result")
            api_text = gr.Textbox(label="answer")
            api_btns = [gr.Button(visible=False) for _ in range(7)]

        model_view = [header, mode, compare_btn, model_dd, models_md, model_key]  # what depends on the model
        # ---- page load: this tab's session (restored after a reload)
        demo.load(h.restore, [tab_id], [session, chatbot, status, docs, pw_row, cmp, memory, *model_view, timer],
                  js=TAB_ID_JS, api_name="ui_restore", **private)
        # ---- model menu (one switch at a time; it waits for running answers in the model's queue)
        load_btn.click(h.load_model, [model_dd, mode], [model_status, *model_view], api_name="ui_load_model",
                       concurrency_limit=4, concurrency_id="model", show_progress="hidden", **private)
        # ---- documents
        proc_out = [status, docs, pw_row, pw, files]
        work = dict(concurrency_limit=16, concurrency_id="work", show_progress="hidden", **private)
        files.upload(h.upload, [files, mode, session], proc_out, api_name="ui_upload", **work)
        for trigger in (unlock_btn.click, pw.submit):
            trigger(h.unlock, [pw, mode, session], proc_out, api_name="ui_unlock", **work)
        clear_docs_btn.click(h.clear_documents, [session], [status, docs, pw_row], api_name="ui_clear_documents",
                             **private)
        mode.change(h.mode_changed, [mode, session], [status, docs], api_name="ui_mode", **private)
        # ---- chat
        for trigger in (send_btn.click, question.submit):
            trigger(h.ask, [question, mode, max_new, temperature, session], [chatbot, question, status],
                    api_name="ui_ask", **work)
        regen_btn.click(h.regenerate, [mode, max_new, temperature, session], [chatbot, question, status],
                        api_name="ui_regenerate", **work)
        control = dict(concurrency_limit=None, concurrency_id="control", show_progress="hidden", **private)
        stop_btn.click(h.stop, [session], [status], api_name="ui_stop", **control)
        clear_btn.click(h.clear_chat, [session], [chatbot, status, cmp], api_name="ui_clear_chat", **private)
        compare_btn.click(h.compare, [question, max_new, temperature, session], [cmp, status], api_name="ui_compare",
                          **work)
        export_md_btn.click(h.export_markdown, [session], [export_file], api_name="ui_export_md", **private)
        export_json_btn.click(h.export_json, [session], [export_file], api_name="ui_export_json", **private)
        # ---- live memory panel (about once a second, also while generating); a model loaded elsewhere
        timer.tick(h.tick, [session, model_key, mode], [memory, *model_view], api_name="ui_memory", **control)

        # ---- API
        api = dict(api_visibility="public")
        api_btns[0].click(h.api_upload, [api_files, api_password, api_session], [api_json], api_name="upload",
                          concurrency_limit=16, concurrency_id="work", **api)
        api_btns[1].click(h.api_ask, [api_question, api_mode, api_max_new, api_session], [api_text], api_name="ask",
                          concurrency_limit=16, concurrency_id="work", **api)
        api_btns[2].click(h.api_memory, [api_session], [api_json], api_name="memory", concurrency_limit=None,
                          concurrency_id="control", **api)
        api_btns[3].click(h.api_stop, [api_session], [api_json], api_name="stop", concurrency_limit=None,
                          concurrency_id="control", **api)
        api_btns[4].click(h.api_compare, [api_question, api_max_new, api_session], [api_json], api_name="compare",
                          concurrency_limit=16, concurrency_id="work", **api)
        api_btns[5].click(h.api_info, None, [api_json], api_name="info", concurrency_limit=None,
                          concurrency_id="control", **api)
        api_btns[6].click(h.api_load_model, [api_preset], [api_json], api_name="load_model", concurrency_limit=4,
                          concurrency_id="model", **api)
    for fn in demo.fns.values():  # the per-connection Session factory is no API endpoint
        if fn.fn is Session:
            fn.api_visibility = "private"
    return demo
