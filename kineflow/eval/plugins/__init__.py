"""Model classes for other projects' benchmark harnesses (``pip install kineflow[eval]``).

* :mod:`~kineflow.eval.plugins.vlmevalkit`: :class:`KineflowVLM`, a VLMEvalKit model
  (``generate(message, dataset=None) -> str``), needing nothing from VLMEvalKit itself;
* :mod:`~kineflow.eval.plugins.lmms_model`: an lmms-eval model (``generate_until``),
  registered through lmms-eval's ``lmms_eval.models`` entry-point group (imports lmms-eval);
* :mod:`~kineflow.eval.plugins.answerer`: the question-answering front both use.
"""
