// MathJax 3 settings for the notebooks' $inline$ and $$display$$ math (loaded before MathJax itself).
window.MathJax = {
  tex: { inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']], processEscapes: true },
  options: { ignoreHtmlClass: '.*', processHtmlClass: 'jp-MarkdownOutput|jp-RenderedMarkdown|md-typeset' }
};
